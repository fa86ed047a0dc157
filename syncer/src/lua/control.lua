-- An operator's control of a live sale, written into one sale hash (a goods', or one shard's)
-- after MySQL recorded it. The deduct script reads the same hash in its one atomic call, so an
-- attempt is decided either wholly before a control or wholly after it.
-- KEYS: 1 sale hash, 2 epoch (the last one loaded here)
-- ARGV: 1 action ("pause" | "resume" | "stop" | "add"), 2 the goods' epoch when MySQL
--       recorded the control, 3 "1" when no load of Redis under that epoch can still come (MySQL
--       loaded it already, or decides the goods itself), then per action:
--       pause: 4 retry-after ms (> 0); stop: 4 the end MySQL recorded, ms;
--       add: 4 operation id, 5 units
-- Reply: { status, value }:
--   "applied"  this sale hash holds the control now (value: its available units);
--   "already"  add only: this operation's units were added here before (value: available);
--   "reloaded" add only: the sale was loaded under a later epoch, from MySQL, which had the
--              units already: nothing to add here;
--   "missing"  this Redis has no sale of that epoch and none is on its way (it forgot the
--              goods, or MySQL decides it): the next load reads MySQL, which has the control;
--   "behind"   a load under the control's epoch may still come (a preheat or re-seed under
--              way) and would not carry it: nothing changed, call again once it landed
--              (value: the epoch this Redis loaded last).
-- Uses the prelude (common.lua): clock_ms.
local action, epoch, settled = ARGV[1], tonumber(ARGV[2]), ARGV[3] == '1'

local sale = redis.call('HMGET', KEYS[1], 'epoch', 'available', 'end_ms', 'start_ms')
local sale_epoch = tonumber(sale[1] or '-1')
if sale_epoch < epoch then
  -- A load under `epoch` read MySQL before the control was recorded; if it can still land,
  -- applying the control now would be overwritten by it.
  if settled then
    return { 'missing', 0 }
  end
  return { 'behind', tonumber(redis.call('GET', KEYS[2]) or '0') }
end

if action == 'add' then
  -- A later epoch was loaded from MySQL after the units were added there: it has them.
  if sale_epoch > epoch then
    return { 'reloaded', tonumber(sale[2]) }
  end
  local field = 'added:' .. ARGV[4]
  if redis.call('HEXISTS', KEYS[1], field) == 1 then
    return { 'already', tonumber(sale[2]) }
  end
  local units = tonumber(ARGV[5])
  -- total and available move together: total = available + reserved + sold + lapsed holds.
  redis.call('HINCRBY', KEYS[1], 'total', units)
  local available = redis.call('HINCRBY', KEYS[1], 'available', units)
  -- The mark lives and dies with the sale hash (a load under a later epoch replaces both).
  redis.call('HSET', KEYS[1], field, units)
  return { 'applied', available }
end

-- Flags are idempotent: applying one to a sale loaded later (which read it from MySQL
-- already) changes nothing.
if action == 'pause' then
  redis.call('HSET', KEYS[1], 'pause_retry_ms', ARGV[4])
elseif action == 'resume' then
  redis.call('HDEL', KEYS[1], 'pause_retry_ms')
elseif action == 'stop' then
  -- The sale ends now by this Redis's clock (the one its deduct script judges by), or at the
  -- end MySQL recorded if that is earlier: after this call no attempt is decided as open.
  local end_ms = math.min(tonumber(sale[3]), tonumber(ARGV[4]), clock_ms())
  redis.call('HSET', KEYS[1], 'end_ms', end_ms, 'start_ms', math.min(tonumber(sale[4]), end_ms))
  -- An ended sale is not paused (it answers `ended` first in any case).
  redis.call('HDEL', KEYS[1], 'pause_retry_ms')
else
  return redis.error_reply('unknown control action ' .. tostring(action))
end
return { 'applied', tonumber(sale[2]) }
