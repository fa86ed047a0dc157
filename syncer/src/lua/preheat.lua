-- Loads one sale into Redis under an epoch MySQL handed out (and recorded) first.
-- KEYS: 1 sale hash, 2 users hash, 3 requests hash, 4 reservations hash, 5 epoch (the last
--       one loaded here), 6 expiries sorted set, 7 settled hash, 8 unclaimed sorted set,
--       9 lapsed orders set, 10 transfers out hash, 11 transfers in set (a shard's, `shard.rs`)
-- ARGV: 1 total stock, 2 per-user limit, 3 start ms, 4 end ms, 5 force ("1" or "0"),
--       6 payment window ms, 7 epoch, 8 and 9 the fleet-wide rate's GCRA emission interval and
--       burst tolerance in ms ("0": no fleet-wide rate), 10 the tier ("redis" or "dual_write":
--       the deduct script marks dual_write wins, so no syncer sells one without its row),
--       11 the pause's retry-after ms MySQL holds ("0": not paused; `control/`),
--       12 and 13 (optional) the shard count and this shard's index for one shard of a
--       redis_sharded goods: its order sequences are `local * shards + shard`
-- Reply: { "loaded", epoch }, { "stale", loaded epoch } when this Redis already loaded that
-- epoch or a later one, or { "live", end_ms } when a live sale is in the way.
-- The outbox stream is never touched: it may still hold events on their way to Kafka.
-- Uses the prelude (common.lua): clock_ms.
local epoch = tonumber(ARGV[7])
-- Epochs only move forward: two preheats at once took different epochs from MySQL, and the
-- later one must stand whichever reaches Redis first. Checked first of all, force or not.
local loaded = tonumber(redis.call('GET', KEYS[5]) or '0')
if epoch <= loaded then
  return { 'stale', loaded }
end
local now_ms = clock_ms()
local existing_end = redis.call('HGET', KEYS[1], 'end_ms')
if existing_end and ARGV[5] ~= '1' then
  if now_ms < tonumber(existing_end) then
    return { 'live', tonumber(existing_end) }
  end
end
-- A shard's transfers of an earlier round go too: they never land in this one.
redis.call('DEL', KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[6], KEYS[7], KEYS[8], KEYS[9], KEYS[10],
  KEYS[11])
redis.call('SET', KEYS[5], ARGV[7])
-- swept_ms: the sweeper measures stalls from here (see lifecycle.lua), even before its
-- first sweep of this sale.
redis.call('HSET', KEYS[1],
  'total', ARGV[1], 'available', ARGV[1], 'reserved', 0, 'sold', 0, 'lapsed', 0,
  'limit', ARGV[2], 'start_ms', ARGV[3], 'end_ms', ARGV[4], 'window_ms', ARGV[6],
  'epoch', ARGV[7], 'seq', 0, 'swept_ms', now_ms,
  'rate_interval_ms', ARGV[8], 'rate_tolerance_ms', ARGV[9], 'tier', ARGV[10])
if tonumber(ARGV[11]) > 0 then
  redis.call('HSET', KEYS[1], 'pause_retry_ms', ARGV[11])
end
if ARGV[12] then
  redis.call('HSET', KEYS[1], 'shards', ARGV[12], 'shard', ARGV[13])
end
return { 'loaded', epoch }
