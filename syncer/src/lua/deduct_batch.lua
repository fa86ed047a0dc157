-- A batch of purchase attempts for one goods, decided in arrival order and recorded
-- atomically. Batching amortises the script call: under load one call serves many buyers.
-- KEYS: 1 sale hash, 2 users hash, 3 requests hash, 4 reservations hash, 5 outbox stream,
--       6 expiries sorted set, 7 unclaimed sorted set (claim deadlines), 8 settled hash
-- ARGV: 1 goods id, 2 deadline (ms since the epoch, by Redis's clock), 3 claim window ms
--       (0: the reservation is delivered by this very answer and needs no claim), 4 the epoch
--       MySQL last loaded into Redis for this goods (0: not known), then one
--       (user id, quantity, request id) triple per attempt
-- Reply: one { outcome, order_id or "", remaining (-1 unknown), at_ms, reason or "" } per
-- attempt, always that shape; at_ms is the retry-after (ms) of not_started, paused and
-- fleet_rate_limited, and for won the reservation's payment deadline (ms since the epoch,
-- what the syncer signs into the winner's pass), else 0; a new order's reason is "new" (a repeat answer's is ""),
-- so the caller can tell the ids handed out by this call; for a dual_write sale "new_dw" and
-- "dw", so the caller writes the winner's row before answering, whatever it thought the tier. "stale" for every attempt: this
-- Redis forgot the sale (it is missing, behind the epoch MySQL loaded, or fenced after its
-- sequence went back) and decides nothing. Uses the prelude (common.lua): clock_ms, parse_record,
-- make_record, append_event.
local goods = ARGV[1]
local deadline_ms, claim_ms = tonumber(ARGV[2]), tonumber(ARGV[3])
local expected_epoch = tonumber(ARGV[4])
local attempts = (#ARGV - 4) / 3
local replies = {}

local now_ms = clock_ms()

-- The caller has stopped waiting (Redis stalled, or the call queued too long): an answer now
-- would reach nobody, so nothing is decided and nothing changes. Checked first of all.
if now_ms > deadline_ms then
  for i = 1, attempts do replies[i] = { 'too_late', '', -1, 0, '' } end
  return replies
end

local sale = redis.call('HMGET', KEYS[1], 'available', 'limit', 'start_ms', 'end_ms', 'epoch', 'seq', 'window_ms', 'fenced',
  'rate_interval_ms', 'rate_tolerance_ms', 'rate_tat_ms', 'tier', 'shards', 'shard', 'pause_retry_ms')
-- A Redis that forgot is never trusted: MySQL loaded this goods, so a missing sale, an epoch
-- behind MySQL's or a fence means state was lost, and deciding on would hand out units and
-- order ids twice.
if (not sale[1] and expected_epoch > 0) or sale[8] == '1'
    or (sale[1] and tonumber(sale[5]) < expected_epoch) then
  for i = 1, attempts do replies[i] = { 'stale', '', -1, 0, '' } end
  return replies
end
if not sale[1] then
  for i = 1, attempts do replies[i] = { 'unknown_goods', '', -1, 0, '' } end
  return replies
end
local available = tonumber(sale[1])
local limit, start_ms, end_ms = tonumber(sale[2]), tonumber(sale[3]), tonumber(sale[4])
local epoch, seq, window_ms = sale[5], tonumber(sale[6]), tonumber(sale[7])
local granted = 0
-- The fleet-wide rate (GCRA): one theoretical arrival time for every gate at once. A sale
-- loaded before it existed has none.
local rate_interval = tonumber(sale[9] or '0') or 0
local rate_tolerance = tonumber(sale[10] or '0') or 0
local rate_tat = tonumber(sale[11] or '0') or 0
local rate_used = false
local dual_write = sale[12] == 'dual_write'
local new_mark, repeat_mark = 'new', ''
-- One shard of a redis_sharded goods hands out the sequences `local * shards + shard`: the
-- goods' order ids stay `goods.epoch.sequence`, distinct over its shards, and the sequence
-- names the shard that holds the order (lifecycle calls are routed by it).
local shards, shard = tonumber(sale[13] or '1') or 1, tonumber(sale[14] or '0') or 0
-- An operator's pause (control.lua): > 0 while paused, the Retry-After buyers are told.
local pause_retry_ms = tonumber(sale[15] or '0') or 0
if dual_write then
  new_mark, repeat_mark = 'new_dw', 'dw'
end

-- Takes one attempt's cell of the fleet-wide rate; returns the ms to wait when over it.
local function over_rate()
  if rate_interval <= 0 then
    return nil
  end
  local tat = math.max(rate_tat, now_ms)
  if tat - now_ms > rate_tolerance then
    return math.ceil(tat - now_ms - rate_tolerance)
  end
  rate_tat = tat + rate_interval
  rate_used = true
  return nil
end

-- What a request id that won before gets now. An order id is handed out again only while its
-- reservation is live; a dead order is never forwarded again. Returns nil when the request
-- is to be decided afresh: its order was never delivered (the shop failed it, or nobody
-- claimed it), so the buyer never had it and a retry is a new attempt with a new order id.
local function repeat_answer(prior_order)
  if redis.call('HEXISTS', KEYS[4], prior_order) == 1 then
    -- Its deadline is the one it was made with (a repeat does not extend it).
    local deadline = tonumber(redis.call('ZSCORE', KEYS[6], prior_order)) or (now_ms + window_ms)
    return { 'won', prior_order, available, deadline, repeat_mark }
  end
  local final = redis.call('HGET', KEYS[8], prior_order)
  if final == 'confirmed' then
    return { 'confirmed', prior_order, available, 0, '' }
  end
  local reason = final and string.match(final, '^released:(.+)$') or 'ended'
  if reason == 'upstream_failed' or reason == 'unclaimed' then
    return nil
  end
  return { 'released', prior_order, available, 0, reason }
end

local function decide(user, qty, request_id)
  -- Idempotency first: a retry gets the answer it got before, even after the sale closed.
  local prior = redis.call('HGET', KEYS[3], request_id)
  if prior then
    local prior_user, prior_qty, prior_order = parse_record(prior)
    if prior_user ~= user or prior_qty ~= qty then
      return { 'request_id_conflict', '', available, 0, '' }
    end
    local answer = repeat_answer(prior_order)
    if answer then
      return answer
    end
  end
  if now_ms < start_ms then
    return { 'not_started', '', available, start_ms - now_ms, '' }
  end
  if now_ms >= end_ms then
    return { 'ended', '', available, 0, '' }
  end
  -- Paused: nothing is decided, not even a cell of the fleet-wide rate. After the window
  -- checks (an ended sale says so) and before the stock (a pause is never a sold-out).
  if pause_retry_ms > 0 then
    return { 'paused', '', available, pause_retry_ms, '' }
  end
  -- Every attempt decided afresh takes a cell of the fleet-wide rate (repeats, early and late
  -- ones do not); over it, nothing is decided.
  local wait_ms = over_rate()
  if wait_ms then
    return { 'fleet_rate_limited', '', available, math.max(wait_ms, 1), '' }
  end
  -- The buyer is checked before anything is decremented: a refused buyer costs no stock.
  local held = tonumber(redis.call('HGET', KEYS[2], user) or '0')
  if held >= limit then
    return { 'duplicate', '', available, 0, '' }
  end
  if held + qty > limit then
    return { 'limit_reached', '', available, 0, '' }
  end
  if available < qty then
    return { 'sold_out', '', available, 0, '' }
  end
  seq = seq + 1
  available = available - qty
  granted = granted + qty
  local order_id = goods .. '.' .. epoch .. '.' .. (seq * shards + shard)
  redis.call('HINCRBY', KEYS[2], user, qty)
  redis.call('HSET', KEYS[3], request_id, make_record(user, qty, order_id))
  redis.call('HSET', KEYS[4], order_id, make_record(user, qty, now_ms))
  -- It lives for the payment window; and until the gate claims it (it reached the shop),
  -- only for the claim window. The sweeper releases it when either is up.
  local deadline = now_ms + window_ms
  redis.call('ZADD', KEYS[6], deadline, order_id)
  if claim_ms > 0 then
    redis.call('ZADD', KEYS[7], now_ms + claim_ms, order_id)
  end
  -- The outbox entry is written by the same script: no reservation without its event.
  append_event(KEYS[5], {
    type = 'reserved', order_id = order_id, goods_id = goods, user_id = user,
    quantity = qty, request_id = request_id, at_ms = now_ms })
  return { 'won', order_id, available, deadline, new_mark }
end

for i = 1, attempts do
  local base = 5 + (i - 1) * 3
  replies[i] = decide(ARGV[base], tonumber(ARGV[base + 1]), ARGV[base + 2])
end
if rate_used then
  redis.call('HSET', KEYS[1], 'rate_tat_ms', rate_tat)
end
if granted > 0 then
  -- available + reserved stays equal to what it was: conservation holds when the script ends.
  redis.call('HSET', KEYS[1], 'available', available, 'seq', seq)
  redis.call('HINCRBY', KEYS[1], 'reserved', granted)
end
return replies
