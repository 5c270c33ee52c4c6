-- Append events to one strategy's stream, exactly once per source position.
-- All keys share the strategy's hash tag, so this runs on one Cluster slot.
-- KEYS[1] events stream  KEYS[2] epoch  KEYS[3] snapshot hash  KEYS[4] positions hash
-- ARGV[1] retention mode ('minid' | 'maxlen' | '')  ARGV[2] retention ms or max length
-- ARGV[3] epoch to use if the stream is new  ARGV[4] codec version
-- then 7 values per event: tick partition ('' = no position: always appended),
--   tick offset, snapshot op ('set' | 'del' | ''), ts_code, type, schema version, body
-- Returns {epoch, id1, id2, ...} with the ids actually written.
local epoch = redis.call('GET', KEYS[2])
if redis.call('EXISTS', KEYS[1]) == 0 or not epoch then
  -- new, or deleted and recreated: a new epoch, and nothing of the old stream's
  -- positions or snapshot survives (they would describe events that are gone)
  epoch = ARGV[3]
  redis.call('SET', KEYS[2], epoch)
  redis.call('DEL', KEYS[3], KEYS[4])
end
local out = {epoch}
local high = {}
local n = (#ARGV - 4) / 7
for i = 0, n - 1 do
  local b = 5 + i * 7
  local part = ARGV[b]
  local fresh = true
  if part ~= '' then
    local off = tonumber(ARGV[b + 1])
    local cur = high[part]
    if cur == nil then
      cur = tonumber(redis.call('HGET', KEYS[4], part) or '-1')
    end
    if off <= cur then fresh = false else high[part] = off end
  end
  if fresh then
    local id = redis.call('XADD', KEYS[1], '*', 'e', ARGV[b + 6], 'y', ARGV[b + 4], 's', ARGV[b + 5], 'c', ARGV[4])
    out[#out + 1] = id
    if #out == 2 and redis.call('HEXISTS', KEYS[4], '@first') == 0 then
      redis.call('HSET', KEYS[4], '@first', id)
    end
    local op = ARGV[b + 2]
    if op == 'set' then
      redis.call('HSET', KEYS[3], ARGV[b + 3], id .. '\n' .. ARGV[b + 5] .. '\n' .. ARGV[b + 6])
    elseif op == 'del' then
      redis.call('HDEL', KEYS[3], ARGV[b + 3])
    end
  end
end
for part, off in pairs(high) do
  redis.call('HSET', KEYS[4], part, off)
end
if #out > 1 then
  if ARGV[1] == 'minid' then
    local t = redis.call('TIME')
    local cutoff = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) - tonumber(ARGV[2])
    if cutoff > 0 then
      redis.call('XTRIM', KEYS[1], 'MINID', '~', string.format('%d', cutoff))
    end
  elseif ARGV[1] == 'maxlen' then
    redis.call('XTRIM', KEYS[1], 'MAXLEN', '~', ARGV[2])
  end
end
return out
