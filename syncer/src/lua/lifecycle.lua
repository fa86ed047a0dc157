-- Ends reservations, each exactly once: confirm (paid), release (cancelled, upstream failed),
-- or sweep (release every reservation whose time is up: reason "unclaimed" if the gate never
-- claimed it within the claim window, else "expired"); and claim (the gate delivered these
-- reservations: each now lives for its payment window).
-- KEYS: 1 sale hash, 2 users hash, 3 reservations hash, 4 expiries sorted set,
--       5 settled hash, 6 outbox stream, 7 unclaimed set
-- ARGV: 1 goods id, 2 action ("confirm" | "release" | "sweep" | "claim"),
--       3 order id (confirm, release) or batch size (sweep) or first order id (claim),
--       4 release reason (release) or further order ids (claim)
-- Reply: confirm/release { status, state } with status "changed" (this call settled it),
--        "settled" (it was settled before; state says how) or "unknown";
--        sweep { released count }; claim { claimed count, late count }.
local goods, action = ARGV[1], ARGV[2]
local time = redis.call('TIME')
local now_ms = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)

-- Ends one open reservation as released. Units go back to available stock only while the
-- sale this order belongs to is still open: never after it closed (they lapse instead: no
-- stock comes back to life), never into another epoch's counters, never recreating keys.
local function release(order_id, record, reason)
  local user, qty = string.match(record, '^([^|]*)|(%d+)|')
  qty = tonumber(qty)
  redis.call('HDEL', KEYS[3], order_id)
  redis.call('ZREM', KEYS[4], order_id)
  redis.call('SREM', KEYS[7], order_id)
  redis.call('HSET', KEYS[5], order_id, 'released:' .. reason)
  local sale = redis.call('HMGET', KEYS[1], 'epoch', 'end_ms', 'reserved')
  local order_epoch = string.match(order_id, '%.(%d+)%.%d+$')
  local returned = '0'
  if sale[1] and sale[1] == order_epoch and tonumber(sale[3]) >= qty then
    redis.call('HINCRBY', KEYS[1], 'reserved', -qty)
    if now_ms < tonumber(sale[2]) then
      redis.call('HINCRBY', KEYS[1], 'available', qty)
      returned = '1'
    else
      redis.call('HINCRBY', KEYS[1], 'lapsed', qty)
    end
    -- The buyer may buy again what was given back.
    if redis.call('HINCRBY', KEYS[2], user, -qty) <= 0 then
      redis.call('HDEL', KEYS[2], user)
    end
  end
  redis.call('XADD', KEYS[6], '*',
    'type', 'released', 'order_id', order_id, 'goods_id', goods, 'user_id', user,
    'quantity', qty, 'reason', reason, 'returned', returned, 'at_ms', now_ms)
  return 'released:' .. reason
end

-- Why a reservation whose time is up ends: the gate never delivered it, or nobody paid.
local function lapse_reason(order_id)
  if redis.call('SISMEMBER', KEYS[7], order_id) == 1 then
    return 'unclaimed'
  end
  return 'expired'
end

if action == 'claim' then
  local window_ms = tonumber(redis.call('HGET', KEYS[1], 'window_ms') or '0')
  local claimed, late = 0, 0
  for i = 3, #ARGV do
    local order_id = ARGV[i]
    local record = redis.call('HGET', KEYS[3], order_id)
    if not record then
      late = late + 1
    elseif redis.call('SREM', KEYS[7], order_id) == 1 then
      -- From now on it lives for the payment window counted from when it was reserved.
      local reserved_at = tonumber(string.match(record, '|(%d+)$'))
      redis.call('ZADD', KEYS[4], 'XX', reserved_at + window_ms, order_id)
      claimed = claimed + 1
    end
  end
  return { claimed, late }
end

if action == 'sweep' then
  local due = redis.call('ZRANGEBYSCORE', KEYS[4], '-inf', now_ms, 'LIMIT', 0, tonumber(ARGV[3]))
  local released = 0
  for _, order_id in ipairs(due) do
    local record = redis.call('HGET', KEYS[3], order_id)
    if record then
      release(order_id, record, lapse_reason(order_id))
      released = released + 1
    else
      redis.call('ZREM', KEYS[4], order_id)
    end
  end
  return { released }
end

local order_id = ARGV[3]
local record = redis.call('HGET', KEYS[3], order_id)
if not record then
  local final = redis.call('HGET', KEYS[5], order_id)
  if final then
    return { 'settled', final }
  end
  return { 'unknown', '' }
end

if action == 'confirm' then
  local expires = redis.call('ZSCORE', KEYS[4], order_id)
  if expires and now_ms >= tonumber(expires) then
    -- Paid too late: the window is exact, whether or not the sweeper got there first.
    return { 'settled', release(order_id, record, lapse_reason(order_id)) }
  end
  local user, qty = string.match(record, '^([^|]*)|(%d+)|')
  qty = tonumber(qty)
  redis.call('HDEL', KEYS[3], order_id)
  redis.call('ZREM', KEYS[4], order_id)
  redis.call('SREM', KEYS[7], order_id)
  redis.call('HSET', KEYS[5], order_id, 'confirmed')
  local sale = redis.call('HMGET', KEYS[1], 'epoch', 'reserved')
  if sale[1] and sale[1] == string.match(order_id, '%.(%d+)%.%d+$') and tonumber(sale[2]) >= qty then
    redis.call('HINCRBY', KEYS[1], 'reserved', -qty)
    redis.call('HINCRBY', KEYS[1], 'sold', qty)
  end
  redis.call('XADD', KEYS[6], '*',
    'type', 'confirmed', 'order_id', order_id, 'goods_id', goods, 'user_id', user,
    'quantity', qty, 'at_ms', now_ms)
  return { 'changed', 'confirmed' }
end

if action == 'release' then
  return { 'changed', release(order_id, record, ARGV[4]) }
end
return redis.error_reply('unknown action ' .. tostring(action))
