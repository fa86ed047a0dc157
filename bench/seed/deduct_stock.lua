-- The seed's own deduct script, verbatim: `deductStockScript` ("预扣库存Lua脚本") in the user's
-- design sketch seed/000_206b93c17898e818.txt (方案一, step 1, Go file
-- internal/dao/seckill_stock.go). Only these comment lines are ours; the text below them is the
-- seed's, byte for byte. The seed calls it with
--   KEYS = { "goods:stock:<goods id>", "goods:stock:lock:<goods id>" },
--   ARGV = { deductAmount (1), expireTime (3600 * 24) }.
-- seckill-bench-hot runs it with redis-benchmark as the baseline the batch endpoint is
-- measured against. (Its success reply, a Lua table with only named fields, reaches the
-- caller as an empty array: one of the pitfalls ARCHITECTURE.md lists.)
local stockKey = KEYS[1]
local stockLockKey = KEYS[2]
local deductAmount = tonumber(ARGV[1])
local expireTime = tonumber(ARGV[2])

-- 获取当前库存
local currentStock = redis.call('GET', stockKey)
if currentStock == false then
    return {err = 'STOCK_NOT_FOUND'}
end

currentStock = tonumber(currentStock)
if currentStock < deductAmount then
    return {err = 'STOCK_NOT_ENOUGH', stock = currentStock}
end

-- 扣减库存
local newStock = currentStock - deductAmount
redis.call('SET', stockKey, newStock, 'EX', expireTime)

-- 记录预扣信息（用于后续数据库同步）
local lockValue = redis.call('INCR', stockLockKey)
redis.call('EXPIRE', stockLockKey, expireTime)

return {ok = 1, stock = newStock, lockId = lockValue}
