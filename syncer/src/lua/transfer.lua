-- Moves units between two shards of one redis_sharded goods (`shard.rs`). A move is two
-- calls, one on each shard (they live in different slots, so no script can touch both): a
-- take on the donor records the transfer under its id, then a give on the receiver adds the
-- units once (the id is remembered there), then done on the donor forgets the record. A
-- process that dies between take and give leaves the record, which the sweeper finds
-- (pending) and completes: units are never lost nor counted twice. Each shard keeps
-- total = available + reserved + sold + lapsed; the goods' total is the shards' totals plus
-- the units of the records not yet done.
-- Every take and give counts in the sale's `moves`, so that a caller reading every shard twice
-- can tell whether anything moved between its two reads (`peek`).
-- KEYS: 1 this shard's sale hash, 2 its transfers out hash (take, done, pending, peek) or
--       its transfers in set (give)
-- ARGV: 1 action, then
--   take:    2 transfer id, 3 receiving shard, 4 units wanted, 5 the epoch the caller expects
--            -> { 'taken', units, available left } (at least the units wanted when the shard
--               has them, else all it has; a repeated id answers its record's units),
--               { 'empty', 0, transfers out not yet done }, or { 'stale', 0, 0 } (the sale is
--               missing, fenced, or of another epoch)
--   give:    2 transfer id, 3 units, 4 epoch -> { 'given' | 'repeat' | 'stale', units, available }
--   done:    2 transfer id -> { 'done', 0, 0 }
--   peek:    -> { available, moves, transfers out not yet done }
--   pending: 2 records older than this many ms, 3 at most this many
--            -> flat { id, record, id, record, ... }
-- Uses the prelude (common.lua): clock_ms, parse_record, make_record.
local action = ARGV[1]

-- The sale of this shard, if it is the one the caller expects.
local function live_sale(expected_epoch)
  local sale = redis.call('HMGET', KEYS[1], 'available', 'epoch', 'fenced')
  if not sale[1] or sale[3] == '1' or sale[2] ~= expected_epoch then
    return nil
  end
  return tonumber(sale[1])
end

if action == 'take' then
  local id, to, wanted = ARGV[2], ARGV[3], tonumber(ARGV[4])
  local available = live_sale(ARGV[5])
  if not available then
    return { 'stale', 0, 0 }
  end
  local prior = redis.call('HGET', KEYS[2], id)
  if prior then
    local _, units = parse_record(prior)
    return { 'taken', units or 0, available }
  end
  -- At least what is wanted, and half of what is left: the buyers of the receiving shard
  -- keep coming, and one move now spares many later (leftover stock is rebalanced).
  local units = math.min(available, math.max(wanted, math.ceil(available / 2)))
  if units <= 0 then
    return { 'empty', 0, redis.call('HLEN', KEYS[2]) }
  end
  redis.call('HINCRBY', KEYS[1], 'available', -units)
  redis.call('HINCRBY', KEYS[1], 'total', -units)
  redis.call('HINCRBY', KEYS[1], 'moves', 1)
  redis.call('HSET', KEYS[2], id, make_record(to, units, clock_ms()))
  return { 'taken', units, available - units }
end

if action == 'give' then
  local id, units = ARGV[2], tonumber(ARGV[3])
  local available = live_sale(ARGV[4])
  if not available then
    return { 'stale', 0, 0 }
  end
  if redis.call('SADD', KEYS[2], id) == 0 then
    return { 'repeat', units, available }
  end
  redis.call('HINCRBY', KEYS[1], 'available', units)
  redis.call('HINCRBY', KEYS[1], 'total', units)
  redis.call('HINCRBY', KEYS[1], 'moves', 1)
  return { 'given', units, available + units }
end

if action == 'done' then
  redis.call('HDEL', KEYS[2], ARGV[2])
  return { 'done', 0, 0 }
end

if action == 'peek' then
  local sale = redis.call('HMGET', KEYS[1], 'available', 'moves')
  return { tonumber(sale[1] or '0'), tonumber(sale[2] or '0'), redis.call('HLEN', KEYS[2]) }
end

if action == 'pending' then
  local before = clock_ms() - tonumber(ARGV[2])
  local limit = tonumber(ARGV[3])
  local found = {}
  local entries = redis.call('HGETALL', KEYS[2])
  for i = 1, #entries, 2 do
    if #found >= 2 * limit then
      break
    end
    local _, _, at = parse_record(entries[i + 1])
    if not at or tonumber(at) < before then
      found[#found + 1] = entries[i]
      found[#found + 1] = entries[i + 1]
    end
  end
  return found
end

return redis.error_reply('unknown transfer action ' .. tostring(action))
