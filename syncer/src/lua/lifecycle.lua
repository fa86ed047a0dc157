-- Ends reservations, each exactly once: confirm (paid), release (cancelled, upstream failed),
-- or sweep (release every reservation whose time is up: reason "unclaimed" if the gate never
-- claimed it within the claim window, else "expired"); and claim (the gate delivered these
-- reservations: each now lives for its payment window).
-- KEYS: 1 sale hash, 2 users hash, 3 reservations hash, 4 expiries sorted set,
--       5 settled hash, 6 outbox stream, 7 unclaimed sorted set (claim deadlines),
--       8 lapsed orders set (settled orders whose units lapsed)
-- ARGV: 1 goods id, 2 action ("confirm" | "release" | "sweep" | "claim"),
--       3 order id (confirm, release) or batch size (sweep) or first order id (claim),
--       4 release reason (release) or claim window ms (sweep) or further order ids (claim),
--       5 stall ms (sweep): a gap between sweeps longer than this means nothing ran
-- The sale hash also keeps the sweeper's `swept_ms` and `claims_from_ms` (below).
-- Reply: confirm/release { status, state } with status "changed" (this call settled it),
--        "settled" (it was settled before; state says how) or "unknown";
--        sweep { released count }; claim { claimed count, late count }.
-- Uses the prelude (common.lua): clock_ms, parse_record, append_event.
local goods, action = ARGV[1], ARGV[2]
local now_ms = clock_ms()

-- Whether an order's units are in the sale hash's counters: its epoch is the sale's, or one
-- from the round a re-seed loaded (first_epoch; a preheat writes none), never another round's.
local function counted(order_id, sale_epoch, first_epoch)
  local order_epoch = tonumber(string.match(order_id, '%.(%d+)%.%d+$'))
  if not sale_epoch or not order_epoch then
    return false
  end
  local last = tonumber(sale_epoch)
  local first = tonumber(first_epoch or sale_epoch)
  return order_epoch >= first and order_epoch <= last
end

-- Ends one open reservation as released. Units go back to available stock only while the
-- sale this order belongs to is still open: never after it closed (they lapse instead: no
-- stock comes back to life), never into another epoch's counters, never recreating keys.
-- The event says which: "released" (back on sale) or "lapsed" (anything not given back).
local function release(order_id, record, reason)
  local user, qty = parse_record(record)
  redis.call('HDEL', KEYS[3], order_id)
  redis.call('ZREM', KEYS[4], order_id)
  redis.call('ZREM', KEYS[7], order_id)
  redis.call('HSET', KEYS[5], order_id, 'released:' .. reason)
  local sale = redis.call('HMGET', KEYS[1], 'epoch', 'end_ms', 'reserved', 'first_epoch')
  local event_type = 'lapsed'
  if counted(order_id, sale[1], sale[4]) and tonumber(sale[3]) >= qty then
    redis.call('HINCRBY', KEYS[1], 'reserved', -qty)
    if now_ms < tonumber(sale[2]) then
      redis.call('HINCRBY', KEYS[1], 'available', qty)
      event_type = 'released'
    else
      redis.call('HINCRBY', KEYS[1], 'lapsed', qty)
    end
    -- The buyer may buy again what was given back.
    if redis.call('HINCRBY', KEYS[2], user, -qty) <= 0 then
      redis.call('HDEL', KEYS[2], user)
    end
  end
  -- The settled hash says "released" either way; this set keeps which event it was, so
  -- reconcile can replay the order's history exactly (MySQL's stock_returned).
  if event_type == 'lapsed' then
    redis.call('SADD', KEYS[8], order_id)
  end
  append_event(KEYS[6], {
    type = event_type, order_id = order_id, goods_id = goods, user_id = user,
    quantity = qty, reason = reason, at_ms = now_ms })
  return 'released:' .. reason
end

if action == 'claim' then
  -- One ZREM per claim: the reservation's payment window was set when it was made.
  local claimed, late = 0, 0
  for i = 3, #ARGV do
    local order_id = ARGV[i]
    if redis.call('ZREM', KEYS[7], order_id) == 1 then
      claimed = claimed + 1
    elseif redis.call('HEXISTS', KEYS[3], order_id) == 0 then
      late = late + 1
    end
  end
  return { claimed, late }
end

if action == 'sweep' then
  local limit, claim_ms, stall_ms = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
  -- Claims cannot land while Redis stands still or no sweeper runs. After such a gap the gate
  -- gets a whole claim window from now before anything counts as unclaimed: the orders it
  -- delivered just before the gap must not be released for a claim that could not arrive.
  local claims_from = 0
  if redis.call('EXISTS', KEYS[1]) == 1 then
    local state = redis.call('HMGET', KEYS[1], 'swept_ms', 'claims_from_ms')
    claims_from = tonumber(state[2] or '0')
    if state[1] and now_ms - tonumber(state[1]) > stall_ms then
      claims_from = now_ms + claim_ms
      redis.call('HSET', KEYS[1], 'claims_from_ms', claims_from)
    end
    redis.call('HSET', KEYS[1], 'swept_ms', now_ms)
  end
  local due_sets = { { KEYS[4], 'expired' } }
  if now_ms >= claims_from then
    -- Unclaimed first: their window is the shorter.
    table.insert(due_sets, 1, { KEYS[7], 'unclaimed' })
  end
  -- At most ARGV[3] in all.
  local released = 0
  for _, due_set in ipairs(due_sets) do
    local due = redis.call('ZRANGEBYSCORE', due_set[1], '-inf', now_ms, 'LIMIT', 0, limit - released)
    for _, order_id in ipairs(due) do
      local record = redis.call('HGET', KEYS[3], order_id)
      if record then
        release(order_id, record, due_set[2])
        released = released + 1
      else
        redis.call('ZREM', due_set[1], order_id)
      end
    end
    if released >= limit then
      break
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
  -- A confirm proves the shop has the order, claimed or not: only the payment window counts.
  local expires = redis.call('ZSCORE', KEYS[4], order_id)
  if expires and now_ms >= tonumber(expires) then
    -- Paid too late: the window is exact, whether or not the sweeper got there first.
    return { 'settled', release(order_id, record, 'expired') }
  end
  local user, qty = parse_record(record)
  redis.call('HDEL', KEYS[3], order_id)
  redis.call('ZREM', KEYS[4], order_id)
  redis.call('ZREM', KEYS[7], order_id)
  redis.call('HSET', KEYS[5], order_id, 'confirmed')
  local sale = redis.call('HMGET', KEYS[1], 'epoch', 'reserved', 'first_epoch')
  if counted(order_id, sale[1], sale[3]) and tonumber(sale[2]) >= qty then
    redis.call('HINCRBY', KEYS[1], 'reserved', -qty)
    redis.call('HINCRBY', KEYS[1], 'sold', qty)
  end
  append_event(KEYS[6], {
    type = 'confirmed', order_id = order_id, goods_id = goods, user_id = user,
    quantity = qty, at_ms = now_ms })
  return { 'changed', 'confirmed' }
end

if action == 'release' then
  return { 'changed', release(order_id, record, ARGV[4]) }
end
return redis.error_reply('unknown action ' .. tostring(action))
