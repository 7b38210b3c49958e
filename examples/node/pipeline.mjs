// pgcache from Node.js with node-redis: many commands in one round trip.
//
// node-redis pipelines by itself: commands sent in the same tick (here with
// Promise.all of sendCommand) go out together on the one connection and are
// answered in order. Then the same with an explicit pipeline
// (multi().execAsPipeline()), and why MULTI/EXEC (multi().exec()) is the
// wrong tool for reads through pgcache. Against the demo schema of `make run`
// (sql/demo.sql: `users`, ids 1 to 5).
//
//     cd examples/node && npm ci && REDIS_URL=redis://127.0.0.1:<port>/0 node pipeline.mjs
//
// Environment: REDIS_URL (default redis://127.0.0.1:6379/0), TIMEOUT_SECONDS
// (default 30: the whole run). Exits 0 when everything it saw was as
// expected, 1 otherwise.

import { createClient, ErrorReply, MultiErrorReply } from 'redis';

const REDIS_URL = process.env.REDIS_URL || 'redis://127.0.0.1:6379/0';
const TIMEOUT_MS = Number(process.env.TIMEOUT_SECONDS || 30) * 1000;
const IDS = [1, 2, 3, 4, 5];
const READS = 100;

class Failed extends Error {}

function expect(cond, what) {
  if (!cond) throw new Failed(what);
}

const read = (client, id) => client.sendCommand(['PGCACHE.READ', 'users', JSON.stringify({ id })]);

async function stats(client) {
  return JSON.parse(await client.sendCommand(['PGCACHE.STATS']));
}

async function run(client) {
  let before;
  try {
    before = await stats(client);
  } catch (e) {
    if (e instanceof ErrorReply) {
      throw new Failed(`PGCACHE.STATS failed (${e.message}): is the pgcache module loaded in the Redis at ${REDIS_URL}?`);
    }
    throw e;
  }
  console.log(`connected to ${REDIS_URL}: trust_state ${before.trust_state}`);

  // Cold entries first, so the reads below start with misses.
  await Promise.all(IDS.map((id) => client.sendCommand(['PGCACHE.INVALIDATE', 'users', JSON.stringify({ id })])));

  // 100 READs at once. A miss blocks the connection until its row is in,
  // then the next command runs: the repeated keys are hits.
  let started = performance.now();
  const rows = await Promise.all(Array.from({ length: READS }, (_, n) => read(client, IDS[n % IDS.length])));
  const ms = performance.now() - started;
  const after = await stats(client);
  const names = new Map();
  rows.forEach((text, n) => {
    expect(typeof text === 'string', `READ #${n} answered ${text}`);
    const row = JSON.parse(text);
    expect(row.id === IDS[n % IDS.length], `READ #${n} answered row ${text}`);
    names.set(row.name, (names.get(row.name) || 0) + 1);
  });
  console.log(`Promise.all of ${READS} READs answered in ${ms.toFixed(1)} ms: `
    + [...names].map(([name, count]) => `${name} x${count}`).join(', '));
  const misses = after.misses - before.misses;
  const hits = after.hits - before.hits;
  console.log(`STATS: misses +${misses}, hits +${hits}, PostgreSQL queries +${after.pg_queries - before.pg_queries}`);
  expect(misses >= IDS.length, `expected at least ${IDS.length} misses: ${JSON.stringify(after)}`);
  expect(hits >= READS - IDS.length,
    `expected at least ${READS - IDS.length} hits (trust_state ${after.trust_state}): ${JSON.stringify(after)}`);

  // One failing command rejects only its own promise: allSettled keeps the
  // other replies.
  const settled = await Promise.allSettled([
    read(client, 1),
    read(client, 99),
    client.sendCommand(['PGCACHE.READ', 'nosuch', '{"id":1}']),
  ]);
  expect(settled[0].status === 'fulfilled' && JSON.parse(settled[0].value).id === 1,
    `READ users id 1: ${JSON.stringify(settled[0])}`);
  expect(settled[1].status === 'fulfilled' && settled[1].value === null,
    `READ users id 99: ${JSON.stringify(settled[1])}`);
  const error = settled[2].reason;
  expect(settled[2].status === 'rejected' && error instanceof ErrorReply
    && error.message.includes("unknown table 'nosuch'"), `READ nosuch: ${settled[2].status} ${error}`);
  console.log(`allSettled: users 1 -> a row, users 99 -> null, nosuch -> ${error.constructor.name}: ${error.message}`);

  // An explicit pipeline: multi() ... execAsPipeline() sends the commands
  // together WITHOUT MULTI/EXEC and answers an array of replies (it rejects
  // with the first error reply, if any).
  const pipe = client.multi();
  IDS.forEach((id) => pipe.addCommand(['PGCACHE.READ', 'users', JSON.stringify({ id })]));
  pipe.addCommand(['PGCACHE.MULTIREAD', 'users', JSON.stringify(IDS.map((id) => ({ id })))]);
  started = performance.now();
  const replies = await pipe.execAsPipeline();
  expect(replies.length === IDS.length + 1, `execAsPipeline answered ${replies.length} replies`);
  const batch = JSON.parse(replies[IDS.length]);
  expect(batch.length === IDS.length && batch.every((row, i) => row.id === IDS[i]),
    `MULTIREAD answered ${replies[IDS.length]}`);
  console.log(`execAsPipeline: ${IDS.length} READs and a MULTIREAD of ${batch.length} keys in `
    + `${(performance.now() - started).toFixed(1)} ms`);

  // multi().exec() is a transaction (MULTI/EXEC). Inside MULTI a client
  // cannot wait for PostgreSQL: hits are answered, a miss is an error reply.
  try {
    await client.multi()
      .addCommand(['PGCACHE.READ', 'users', '{"id":1}']) // cached above
      .addCommand(['PGCACHE.READ', 'users', '{"id":99}']) // a miss
      .exec();
    throw new Failed('a miss inside MULTI/EXEC did not fail');
  } catch (e) {
    if (!(e instanceof MultiErrorReply)) throw e;
    // e.replies holds every reply, e.errorIndexes says which are errors.
    const [hit, refused] = e.replies;
    expect(JSON.parse(hit).id === 1, `a hit inside MULTI answered ${hit}`);
    expect(e.errorIndexes.length === 1 && e.errorIndexes[0] === 1
      && refused.message.includes('cannot wait for PostgreSQL here'), `a miss inside MULTI answered ${refused}`);
    console.log(`MULTI/EXEC: the hit is answered; the miss -> ${refused.message.split(' (')[0]}`);
  }
}

async function main() {
  setTimeout(() => {
    console.error(`FAILED: not done within ${TIMEOUT_MS / 1000} s`);
    process.exit(1);
  }, TIMEOUT_MS).unref();
  const client = createClient({ url: REDIS_URL, socket: { connectTimeout: 5000, reconnectStrategy: false } });
  client.on('error', () => {});
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
  console.log('OK: pipeline.mjs done');
  return 0;
}

process.exitCode = await main();
