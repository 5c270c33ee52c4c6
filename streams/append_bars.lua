-- Append closed 1-minute bars of one ticks partition, each exactly once, and trim without
-- outrunning the archive. All keys share the partition's hash tag ({klines.N}), so this runs
-- on one Cluster slot and all of it is atomic.
-- KEYS[1] epoch  KEYS[2] set of ts_codes with bars  KEYS[3] hash ts_code -> newest archived id
-- KEYS[3 + i] the bar stream of bar i (one per stock: several bars may name the same stream)
-- ARGV[1] epoch to use if there is none  ARGV[2] entries kept per stock (0: no trimming)
-- ARGV[3] '1': never trim an entry the archive does not hold yet  ARGV[4] codec version
-- then 3 values per bar: ts_code, start (ms), body (the bar's JSON without its event id)
-- Returns {epoch, id1 or '', id2 or '', ...}: '' for a bar not appended.
--
-- The fence: a stock's bars close in start order, so a bar whose start is not after the
-- newest bar in its stream was appended before (a replay after a worker died between the
-- append and the commit of its ticks) and is skipped. The newest entry is the position:
-- nothing else to keep in step.
local epoch = redis.call('GET', KEYS[1])
if not epoch then
  epoch = ARGV[1]
  redis.call('SET', KEYS[1], epoch)
end
local maxlen, hold, codec = tonumber(ARGV[2]), ARGV[3] == '1', ARGV[4]
local out = {epoch}
for i = 1, #KEYS - 3 do
  local key = KEYS[3 + i]
  local base = 5 + (i - 1) * 3
  local code, start, body = ARGV[base], ARGV[base + 1], ARGV[base + 2]
  local newest = redis.call('XREVRANGE', key, '+', '-', 'COUNT', 1)[1]
  local fresh = true
  if newest then
    local f = newest[2]
    for j = 1, #f, 2 do
      if f[j] == 's' and tonumber(f[j + 1]) >= tonumber(start) then
        fresh = false
      end
    end
  end
  if fresh then
    out[#out + 1] = redis.call('XADD', key, '*', 's', start, 'e', body, 'c', codec)
    redis.call('SADD', KEYS[2], code)
    local excess = maxlen > 0 and redis.call('XLEN', key) - maxlen or 0
    if excess > 0 then
      -- the first entry retention keeps, or the newest archived one if that is older
      local cut = redis.call('XRANGE', key, '-', '+', 'COUNT', excess + 1)[excess + 1][1]
      if hold then
        local archived = redis.call('HGET', KEYS[3], code)
        if not archived then
          cut = nil
        else
          local a1, a2 = string.match(archived, '(%d+)-(%d+)')
          local c1, c2 = string.match(cut, '(%d+)-(%d+)')
          if tonumber(a1) < tonumber(c1) or (tonumber(a1) == tonumber(c1) and tonumber(a2) < tonumber(c2)) then
            cut = archived  -- kept: the archive and Redis overlap by one bar
          end
        end
      end
      if cut then
        redis.call('XTRIM', key, 'MINID', cut)
      end
    end
  else
    out[#out + 1] = ''
  end
end
return out
