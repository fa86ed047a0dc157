-- Shared by every script: `scripts.rs` puts this prelude in front of each one at load time,
-- so the clock, the record format and the outbox entry are written once.

-- cjson keeps this setting across scripts: pin it. 14 significant digits (the most this cjson
-- takes) print every integer below 1e14 exactly, so ms timestamps (until the year 5138) and
-- quantities reach the decoder as integers, never as 1.7e+12.
cjson.encode_number_precision(14)

-- Server time in ms since the epoch, so every syncer instance judges windows by one clock.
local function clock_ms()
  local time = redis.call('TIME')
  return tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
end

-- A record "user|quantity|rest": a requests entry (rest: the order id) or a reservations
-- entry (rest: reserved-at ms). Ids are validated by the caller to [A-Za-z0-9_.:-], so "|"
-- separates. Returns nil when the record is not of that shape.
local function parse_record(record)
  local user, quantity, rest = string.match(record, '^([^|]*)|(%d+)|(.+)$')
  if not user then
    return nil
  end
  return user, tonumber(quantity), rest
end

local function make_record(user, quantity, rest)
  return user .. '|' .. quantity .. '|' .. rest
end

-- Appends one sale event to an outbox stream: one field, the event as JSON, which the relay
-- forwards untouched and `events.rs` decodes (its SaleEvent is the definition of the shape).
local function append_event(stream, event)
  redis.call('XADD', stream, '*', 'event', cjson.encode(event))
end

