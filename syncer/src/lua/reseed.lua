-- Loads a sale Redis forgot back from what MySQL holds, under a new epoch MySQL handed out,
-- in this one call: no deduct or lifecycle call ever sees a half-loaded goods.
-- KEYS: 1 sale hash, 2 users hash, 3 requests hash, 4 reservations hash, 5 epoch (the last
--       one loaded here), 6 expiries sorted set, 7 settled hash, 8 unclaimed sorted set,
--       9 lapsed orders set, 10 outbox stream, 11 transfers out hash, 12 transfers in set
--       (a shard's, `shard.rs`: moves of an earlier epoch never land in this one)
-- ARGV: 1 epoch, 2 first epoch of the round (orders from it on count in these counters),
--       3 total, 4 available, 5 reserved, 6 sold, 7 lapsed, 8 per-user limit, 9 start ms,
--       10 end ms, 11 payment window ms, 12 the orders as JSON (see reseed.rs: users,
--       requests, reservations, settled, lapsed; every value a string), 13 replace ("1":
--       MySQL decided the goods meanwhile, and whatever Redis still holds of it is replaced),
--       14 and 15 the fleet-wide rate's GCRA interval and tolerance ms ("0": none), 16 the tier,
--       17 the pause's retry-after ms MySQL holds ("0": not paused; `control/`),
--       18 and 19 (optional) the shard count and this shard's index, for one shard of a
--       redis_sharded goods (its part of the round: reseed.rs splits it)
-- Reply: { "loaded", epoch }, { "stale", loaded epoch } when this Redis loaded that epoch or a
-- later one, { "live", 0 } when Redis still has the sale (it did not forget), or
-- { "outbox", length } when the outbox still holds events MySQL may not have.
-- Uses the prelude (common.lua): clock_ms.
local epoch = tonumber(ARGV[1])
local loaded = tonumber(redis.call('GET', KEYS[5]) or '0')
if epoch <= loaded then
  return { 'stale', loaded }
end
if redis.call('EXISTS', KEYS[1]) == 1 and ARGV[13] ~= '1' then
  return { 'live', 0 }
end
-- Without the sale hash nothing appends to the outbox; what is left was read by nobody.
local pending = redis.call('XLEN', KEYS[10])
if pending > 0 then
  return { 'outbox', pending }
end
local orders = cjson.decode(ARGV[12])
redis.call('DEL', KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[6], KEYS[7], KEYS[8], KEYS[9],
  KEYS[11], KEYS[12])
redis.call('SET', KEYS[5], ARGV[1])
-- { field, value } pairs into a hash.
local function fill(hash, entries)
  for _, entry in ipairs(entries) do
    redis.call('HSET', hash, entry[1], entry[2])
  end
end
fill(KEYS[2], orders.users)
fill(KEYS[3], orders.requests)
-- { order id, "user|quantity|reserved_at_ms", payment deadline ms }: never into unclaimed,
-- a reservation MySQL has was claimed or came through the single endpoint.
for _, entry in ipairs(orders.reservations) do
  redis.call('HSET', KEYS[4], entry[1], entry[2])
  redis.call('ZADD', KEYS[6], entry[3], entry[1])
end
fill(KEYS[7], orders.settled)
for _, order_id in ipairs(orders.lapsed) do
  redis.call('SADD', KEYS[9], order_id)
end
-- The sale hash last: the fields preheat writes, with MySQL's counters and a fresh sequence.
redis.call('HSET', KEYS[1],
  'total', ARGV[3], 'available', ARGV[4], 'reserved', ARGV[5], 'sold', ARGV[6],
  'lapsed', ARGV[7], 'limit', ARGV[8], 'start_ms', ARGV[9], 'end_ms', ARGV[10],
  'window_ms', ARGV[11], 'epoch', ARGV[1], 'first_epoch', ARGV[2], 'seq', 0,
  'swept_ms', clock_ms(), 'rate_interval_ms', ARGV[14], 'rate_tolerance_ms', ARGV[15],
  'tier', ARGV[16])
if tonumber(ARGV[17]) > 0 then
  redis.call('HSET', KEYS[1], 'pause_retry_ms', ARGV[17])
end
if ARGV[18] then
  redis.call('HSET', KEYS[1], 'shards', ARGV[18], 'shard', ARGV[19])
end
return { 'loaded', epoch }
