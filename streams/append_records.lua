-- Append records to one topic partition with dense offsets (entry id 0-<n>).
-- Works on Redis 6.2 and 7.x, and in Cluster: both keys share one hash tag.
-- KEYS[1] partition stream, KEYS[2] its sequence counter
-- ARGV[1] MAXLEN (0 = no trimming), ARGV[2] codec version,
-- then four values per record: key, value, headers, timestamp ms.
-- Returns the offset of the first record (its id is 0-<offset+1>).
local seq = redis.call('GET', KEYS[2])
if seq then
  seq = tonumber(seq)
else
  -- counter lost or never set: continue after the newest entry, if any
  seq = 0
  local last = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)
  if #last > 0 then
    seq = tonumber(string.match(last[1][1], '%-(%d+)$'))
  end
end
local first = seq
local maxlen = tonumber(ARGV[1])
local n = (#ARGV - 2) / 4
for i = 0, n - 1 do
  local b = 3 + i * 4
  seq = seq + 1
  if maxlen > 0 and i == n - 1 then
    redis.call('XADD', KEYS[1], 'MAXLEN', '~', maxlen, '0-' .. seq,
      'k', ARGV[b], 'v', ARGV[b + 1], 'h', ARGV[b + 2], 't', ARGV[b + 3], 'c', ARGV[2])
  else
    redis.call('XADD', KEYS[1], '0-' .. seq,
      'k', ARGV[b], 'v', ARGV[b + 1], 'h', ARGV[b + 2], 't', ARGV[b + 3], 'c', ARGV[2])
  end
end
redis.call('SET', KEYS[2], seq)
return first
