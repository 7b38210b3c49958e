// pgcache from Node.js with node-redis: the cache events on pubsub.
//
// Subscribes to the events channel on a second connection (a subscribed
// connection only receives), then invalidates, reads (a miss) and reads
// again (a hit) users id 1 of the demo schema (sql/demo.sql), printing each
// event as it arrives. Then it waits for an UPDATE of that row in
// PostgreSQL: the triggers of sql/pgcache.sql (`SELECT pgcache_watch('users')`,
// which `make run` does) make the module drop the entry and publish a
// cache_invalidate with "source":"notify". Run the UPDATE yourself when it
// asks, e.g. with the psql line `make run` prints:
//
//     cd examples/node && npm ci && REDIS_URL=redis://127.0.0.1:<port>/0 node events.mjs
//     psql -h 127.0.0.1 -p <pg port> -U postgres pgcache_demo \
//         -c "UPDATE users SET name = 'Alice A.' WHERE id = 1"
//
// Environment: REDIS_URL (default redis://127.0.0.1:6379/0), EVENTS_CHANNEL
// (the module's events_channel, default pg_cache_events), TIMEOUT_SECONDS
// (default 30: how long to wait for each event), WAIT_FOR_UPDATE (default 1;
// 0 skips the UPDATE step). It exits 0 once it has seen every event it
// expects, 1 when one does not come in time.

import { createClient, ErrorReply } from 'redis';

const REDIS_URL = process.env.REDIS_URL || 'redis://127.0.0.1:6379/0';
const CHANNEL = process.env.EVENTS_CHANNEL || 'pg_cache_events';
const TIMEOUT_MS = Number(process.env.TIMEOUT_SECONDS || 30) * 1000;
const WAIT_FOR_UPDATE = (process.env.WAIT_FOR_UPDATE || '1') !== '0';
const KEY = JSON.stringify({ id: 1 });

class Failed extends Error {}

// Events of users id 1 arrive here; next() waits for the next one that
// `wanted` accepts (earlier ones are skipped), for at most TIMEOUT_MS.
class Events {
  #queue = [];
  #waiter = null;

  push(event) {
    this.#queue.push(event);
    this.#waiter?.();
  }

  async next(wanted, what) {
    const deadline = Date.now() + TIMEOUT_MS;
    for (;;) {
      while (this.#queue.length) {
        const event = this.#queue.shift();
        if (wanted(event)) return event;
      }
      const left = deadline - Date.now();
      if (left <= 0) throw new Failed(`no ${what} event on ${CHANNEL} within ${TIMEOUT_MS / 1000} s`);
      await new Promise((resolve) => {
        const timer = setTimeout(resolve, left);
        this.#waiter = () => { clearTimeout(timer); resolve(); };
      });
      this.#waiter = null;
    }
  }
}

async function run(client, sub) {
  try {
    await client.sendCommand(['PGCACHE.STATS']);
  } catch (e) {
    if (e instanceof ErrorReply) {
      throw new Failed(`PGCACHE.STATS failed (${e.message}): is the pgcache module loaded in the Redis at ${REDIS_URL}?`);
    }
    throw e;
  }

  const events = new Events();
  // subscribe() resolves once Redis has confirmed the subscription.
  await sub.subscribe(CHANNEL, (message) => {
    const event = JSON.parse(message);
    const ours = event.table === 'users' && JSON.stringify(event.key) === KEY;
    const extra = ['source', 'operation'].filter((n) => n in event).map((n) => ` ${n}=${event[n]}`).join('');
    console.log(`event: ${event.type} ${event.table} ${JSON.stringify(event.key)}${extra}${ours ? '' : '  (not ours)'}`);
    if (ours) events.push(event);
  });
  console.log(`subscribed to ${CHANNEL}`);

  await client.sendCommand(['PGCACHE.INVALIDATE', 'users', KEY]);
  await events.next((e) => e.type === 'cache_invalidate' && e.source === 'command', 'cache_invalidate (source command)');
  await client.sendCommand(['PGCACHE.READ', 'users', KEY]);
  await events.next((e) => e.type === 'cache_miss', 'cache_miss');
  await client.sendCommand(['PGCACHE.READ', 'users', KEY]);
  await events.next((e) => e.type === 'cache_hit', 'cache_hit');

  if (WAIT_FOR_UPDATE) {
    console.log(`waiting up to ${TIMEOUT_MS / 1000} s for an UPDATE of users id 1 in PostgreSQL, e.g.: `
      + "UPDATE users SET name = 'Alice A.' WHERE id = 1");
    const event = await events.next((e) => e.type === 'cache_invalidate' && e.source === 'notify',
      'cache_invalidate (source notify)');
    console.log(`the ${event.operation} in PostgreSQL dropped the entry`);
    const row = JSON.parse(await client.sendCommand(['PGCACHE.READ', 'users', KEY]));
    await events.next((e) => e.type === 'cache_miss', 'cache_miss');
    console.log(`READ users ${KEY} -> a miss again, the new row: name '${row.name}'`);
  }
  await sub.unsubscribe(CHANNEL);
}

async function main() {
  // A last resort: the waits above have their own timeouts.
  setTimeout(() => {
    console.error(`FAILED: not done within ${(4 * TIMEOUT_MS) / 1000} s`);
    process.exit(1);
  }, 4 * TIMEOUT_MS).unref();
  const client = createClient({ url: REDIS_URL, socket: { connectTimeout: 5000, reconnectStrategy: false } });
  client.on('error', () => {});
  const sub = client.duplicate();
  sub.on('error', () => {});
  try {
    await client.connect();
    await sub.connect();
  } catch (e) {
    console.error(`FAILED: cannot talk to Redis at ${REDIS_URL}: ${e.message}`);
    if (client.isOpen) client.destroy();
    if (sub.isOpen) sub.destroy();
    return 1;
  }
  try {
    await run(client, sub);
  } catch (e) {
    console.error(e instanceof Failed ? `FAILED: ${e.message}` : `FAILED: unexpected error: ${e.stack || e}`);
    return 1;
  } finally {
    if (client.isOpen) client.destroy();
    if (sub.isOpen) sub.destroy();
  }
  console.log('OK: events.mjs done');
  return 0;
}

process.exitCode = await main();
