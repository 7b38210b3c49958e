-- pgcache figures for the stock redis_exporter (oliver006/redis_exporter,
-- Debian's prometheus-redis-exporter 1.45):
--
--   prometheus-redis-exporter -redis.addr redis://127.0.0.1:6379 \
--       -script /path/to/contrib/prometheus/pgcache.lua
--
-- At each scrape the exporter runs `EVAL <this script> 0 0` and reads the
-- reply as name/value pairs of bulk strings; each pair becomes the gauge
-- redis_script_values{key="<name>"} <value>. So every value below is a
-- string holding a number.
--
-- What it returns (see the README, "Prometheus and Grafana"):
--   pgcache_up                     1 when PGCACHE.STATS answered, else 0
--                                  (module not loaded, or the exporter's
--                                  user may not run it); nothing else then
--   pgcache_<figure>               every integer figure of PGCACHE.STATS
--                                  (pgcache_hits, pgcache_misses, ...)
--   pgcache_version                the module's version as MODULE LIST
--                                  shows it (0.2.0 -> 200)
--   pgcache_listener_connected     1 when the listener is connected
--   pgcache_listener_state_<s>     one-hot over connected, connecting,
--                                  disconnected, off
--   pgcache_listener_error         1 when listener_last_error is not empty
--   pgcache_trust_state_<s>        one-hot over trusted, starting,
--                                  interrupted, flushing, no_listener,
--                                  replica
--
-- A failing PGCACHE.STATS is not raised as an error: redis_exporter 1.45
-- would then report the whole Redis as down (redis_up 0) although its own
-- metrics were collected. pgcache_up 0 says it instead.
--
-- Read-only, no keys; runs on Redis 7.0+ and Valkey (both ship cjson).

local ok, reply = pcall(redis.call, 'PGCACHE.STATS')
if not ok or type(reply) ~= 'string' then
    return {'pgcache_up', '0'}
end
local decoded, stats = pcall(cjson.decode, reply)
if not decoded or type(stats) ~= 'table' then
    return {'pgcache_up', '0'}
end

local out = {'pgcache_up', '1'}
local function put(name, value)
    out[#out + 1] = name
    out[#out + 1] = value
end
-- %.17g: integers print exactly (up to 2^53), without an exponent.
local function number(v)
    return string.format('%.17g', v)
end

-- The integer figures, in name order (a stable reply for redis-cli).
local names = {}
for name, value in pairs(stats) do
    if type(value) == 'number' then
        names[#names + 1] = name
    end
end
table.sort(names)
for _, name in ipairs(names) do
    put('pgcache_' .. name, number(stats[name]))
end

if type(stats.version) == 'string' then
    local major, minor, patch = string.match(stats.version, '^(%d+)%.(%d+)%.(%d+)')
    if major then
        put('pgcache_version', number(major * 10000 + minor * 100 + patch))
    end
end

-- One gauge per known state, 1 for the current one; a state this script
-- does not know yet still shows, as its own gauge at 1.
local function one_hot(prefix, current, known)
    if type(current) ~= 'string' then
        return
    end
    local seen = false
    for _, state in ipairs(known) do
        put(prefix .. state, state == current and '1' or '0')
        seen = seen or state == current
    end
    if not seen and string.match(current, '^[%w_]+$') then
        put(prefix .. current, '1')
    end
end

put('pgcache_listener_connected', stats.listener == 'connected' and '1' or '0')
one_hot('pgcache_listener_state_', stats.listener,
    {'connected', 'connecting', 'disconnected', 'off'})
if type(stats.listener_last_error) == 'string' then
    put('pgcache_listener_error', stats.listener_last_error ~= '' and '1' or '0')
end
one_hot('pgcache_trust_state_', stats.trust_state,
    {'trusted', 'starting', 'interrupted', 'flushing', 'no_listener', 'replica'})

return out
