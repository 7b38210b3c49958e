// pgcache from Node.js with node-redis: one command at a time.
//
// READ (a miss, then a hit), MULTIREAD, WRITE, INVALIDATE, an error reply and
// PGCACHE.STATS, against the demo schema of `make run` (sql/demo.sql: table
// `users`, ids 1 to 5). Module commands go through client.sendCommand([...]),
// whose arguments must all be strings.
//
//     cd examples/node && npm ci && REDIS_URL=redis://127.0.0.1:<port>/0 node plain.mjs
//
// Environment: REDIS_URL (default redis://127.0.0.1:6379/0), TIMEOUT_SECONDS
// (default 30: the whole run). Exits 0 when everything it saw was as
// expected, 1 with a message saying what was not.

import { createClient, ErrorReply } from 'redis';

const REDIS_URL = process.env.REDIS_URL || 'redis://127.0.0.1:6379/0';
const TIMEOUT_MS = Number(process.env.TIMEOUT_SECONDS || 30) * 1000;

class Failed extends Error {}

function expect(cond, what) {
  if (!cond) throw new Failed(what);
}

const pk = (columns) => JSON.stringify(columns);

// PGCACHE.STATS answers one JSON object (a string), not a RESP map.
async function stats(client) {
  return JSON.parse(await client.sendCommand(['PGCACHE.STATS']));
}

async function run(client) {
  let s;
  try {
    s = await stats(client);
  } catch (e) {
    if (e instanceof ErrorReply) {
      throw new Failed(`PGCACHE.STATS failed (${e.message}): is the pgcache module loaded in the Redis at ${REDIS_URL}?`);
    }
    throw e;
  }
  console.log(`connected to ${REDIS_URL}: pgcache ${s.version}, trust_state ${s.trust_state}`);

  // Start from a cold entry, so the first READ is a miss.
  let reply = await client.sendCommand(['PGCACHE.INVALIDATE', 'users', pk({ id: 1 })]);
  expect(reply === 'OK', `INVALIDATE answered ${reply}`);
  console.log('INVALIDATE users {"id":1} -> OK');

  // READ: a miss (the module queries PostgreSQL), then a hit (from Redis).
  const before = await stats(client);
  const text = await client.sendCommand(['PGCACHE.READ', 'users', pk({ id: 1 })]);
  expect(text !== null, 'READ users id 1 answered nil: is sql/demo.sql loaded?');
  const alice = JSON.parse(text); // the row, as row_to_json renders it
  const middle = await stats(client);
  expect(middle.misses - before.misses >= 1, `the first READ was not a miss: ${JSON.stringify(middle)}`);
  console.log(`READ users {"id":1} -> miss, fetched from PostgreSQL: ${text}`);

  const again = await client.sendCommand(['PGCACHE.READ', 'users', pk({ id: 1 })]);
  const after = await stats(client);
  expect(again === text, `the second READ answered ${again}, not ${text}`);
  expect(after.hits - middle.hits >= 1,
    `the second READ was not a hit (trust_state ${after.trust_state}): ${JSON.stringify(after)}`);
  const ttl = await client.ttl('pg_cache:users:{"id":1}'); // the entry is a plain Redis string
  console.log(`READ users {"id":1} -> hit, from Redis: name '${alice.name}', entry TTL ${ttl} s`);

  // A key with no row: nil, which node-redis gives as null.
  const missing = await client.sendCommand(['PGCACHE.READ', 'users', pk({ id: 99 })]);
  expect(missing === null, `READ users id 99 answered ${missing}`);
  console.log('READ users {"id":99} -> null (no such row)');

  // MULTIREAD: one JSON array, aligned with the keys; null where no row.
  const rows = JSON.parse(await client.sendCommand(
    ['PGCACHE.MULTIREAD', 'users', JSON.stringify([{ id: 1 }, { id: 2 }, { id: 99 }])]));
  expect(rows.length === 3 && rows[0].id === 1 && rows[1].id === 2 && rows[2] === null,
    `MULTIREAD answered ${JSON.stringify(rows)}`);
  console.log(`MULTIREAD users [1, 2, 99] -> ${JSON.stringify(rows.map((row) => row && row.name))}`);

  // WRITE stores a value in the cache only (PostgreSQL is not written); the
  // TTL is a string too. The next READ is a hit that answers it.
  const frank = { id: 6, name: 'Frank', email: 'frank@example.com' };
  reply = await client.sendCommand(['PGCACHE.WRITE', 'users', pk({ id: 6 }), JSON.stringify(frank), '60']);
  expect(reply === 'OK', `WRITE answered ${reply}`);
  const cached = JSON.parse(await client.sendCommand(['PGCACHE.READ', 'users', pk({ id: 6 })]));
  expect(cached.name === 'Frank', `READ after WRITE answered ${JSON.stringify(cached)}`);
  console.log(`WRITE users {"id":6} -> OK; READ -> '${cached.name}' from the cache`);

  // INVALIDATE drops it: the next READ asks PostgreSQL, which has no row 6.
  reply = await client.sendCommand(['PGCACHE.INVALIDATE', 'users', pk({ id: 6 })]);
  expect(reply === 'OK', `INVALIDATE answered ${reply}`);
  const gone = await client.sendCommand(['PGCACHE.READ', 'users', pk({ id: 6 })]);
  expect(gone === null, `READ after INVALIDATE answered ${gone}`);
  console.log('INVALIDATE users {"id":6} -> OK; READ -> null (PostgreSQL has no row 6)');

  // Errors are error replies: the promise rejects with an ErrorReply (its
  // message keeps the "ERR " prefix).
  try {
    await client.sendCommand(['PGCACHE.READ', 'nosuch', pk({ id: 1 })]);
    throw new Failed('READ of an unknown table did not fail');
  } catch (e) {
    if (!(e instanceof ErrorReply)) throw e;
    expect(e.message.includes("unknown table 'nosuch'"), `unexpected error text: ${e.message}`);
    console.log(`READ nosuch -> ${e.constructor.name}: ${e.message}`);
  }

  const end = await stats(client);
  const d = (name) => end[name] - before[name];
  console.log(`STATS: hits +${d('hits')}, misses +${d('misses')}, PostgreSQL queries +${d('pg_queries')}, `
    + `writes +${d('writes')}, invalidations +${d('invalidations')}, listener ${end.listener}`);
}

async function main() {
  // Never hang: give up after TIMEOUT_SECONDS whatever happens.
  setTimeout(() => {
    console.error(`FAILED: not done within ${TIMEOUT_MS / 1000} s`);
    process.exit(1);
  }, TIMEOUT_MS).unref();
  // reconnectStrategy false: a refused connection fails at once instead of
  // being retried forever.
  const client = createClient({ url: REDIS_URL, socket: { connectTimeout: 5000, reconnectStrategy: false } });
  client.on('error', () => {}); // reported by the command that fails
  try {
    await client.connect();
  } catch (e) {
    console.error(`FAILED: cannot talk to Redis at ${REDIS_URL}: ${e.message}`);
    return 1;
  }
  try {
    await run(client);
  } catch (e) {
    console.error(e instanceof Failed ? `FAILED: ${e.message}` : `FAILED: unexpected error: ${e.stack || e}`);
    return 1;
  } finally {
    if (client.isOpen) client.destroy();
  }
  console.log('OK: plain.mjs done');
  return 0;
}

process.exitCode = await main();
