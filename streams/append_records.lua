-- Append records to one topic partition with dense offsets (entry id 0-<n>).
-- Works on Redis 6.2 and 7.x, and in Cluster: both keys share one hash tag.
-- KEYS[1] partition stream, KEYS[2] its sequence counter,
-- KEYS[3] its generation hash (Redis Cluster only: see Generations below),
-- KEYS[#KEYS] its compaction hash when ARGV[4] is 'compact' (see below)
-- ARGV[1] MAXLEN (0 = no trimming), ARGV[2] codec version,
-- ARGV[3] expected offset of the first record ('' = append wherever the partition is),
-- ARGV[4] 'compact' for a compacting topic (a table changelog), else '',
-- then five values per record: key, value, headers, timestamp ms, null flags
-- ('v' when the value is None, else empty: the field is then left out).
-- Returns the offset of the first record (its id is 0-<offset+1>), or the error
-- OFFSETCONFLICT when an expected offset is given and the partition is elsewhere:
-- then nothing is written. That check is the fence of a conditional writer (the signals
-- relay): two writers that both believe the partition is at n cannot both append there.
--
-- Compaction (Kafka's cleanup.policy=compact, done at write time): the compaction hash (same
-- slot) maps each record key to the offset of its latest entry; a keyed record XDELs the entry
-- it supersedes, in this same call, so a partition keeps one entry per live key (a tombstone,
-- value None, is a key's latest like any value). Records without a key are never compacted.
-- The newest entry is never deleted, so the highwater's entry always exists and a reader
-- going from earliest to highwater ends; offsets in between have gaps, as in Kafka.
--
-- Generations. Replication is asynchronous: when a replica takes over from a dead master, the
-- last records the master acknowledged may be missing, and the counter with them, so offsets
-- the consumers have already read are handed out again to new records. The generation hash
-- (same slot) keeps the replication id of the server that last wrote here; a script that runs
-- on a server with another id (a promoted replica, or a restart that lost the replication
-- history) starts generation gen+1 at the current next offset. Records of a generation > 0
-- carry `g` = "<gen>:<start>", so a reader that has read past <start> in an older generation
-- knows the offsets from <start> on are new records, and rewinds (streams/driver/consumer.py);
-- the event fence does the same (streams/append_events.lua). Costs one INFO per call (about
-- 9 us of server time, measured): only callers on a Redis Cluster, where a replica can take
-- over, pass KEYS[3] (before the compaction hash); without it (one server) there are no generations and no INFO.
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
local gen, start = 0, 0
-- KEYS[3] is the generation hash only when there is a key beyond the compaction hash's
if #KEYS >= 3 + (ARGV[4] == 'compact' and 1 or 0) then
  local replid = string.match(redis.call('INFO', 'replication'), 'master_replid:(%w+)') or ''
  local g = redis.call('HMGET', KEYS[3], 'replid', 'gen', 'start')
  gen, start = tonumber(g[2] or '0'), tonumber(g[3] or '0')
  if g[1] ~= replid then
    if g[1] then
      gen, start = gen + 1, seq
    end
    redis.call('HSET', KEYS[3], 'replid', replid, 'gen', gen, 'start', start)
  end
end
local mark = gen > 0 and (gen .. ':' .. start) or ''
if ARGV[3] ~= '' and tonumber(ARGV[3]) ~= seq then
  return redis.error_reply('OFFSETCONFLICT expected ' .. ARGV[3] .. ' next ' .. seq)
end
local first = seq
local compact = ARGV[4] == 'compact' and KEYS[#KEYS]
if compact and first == 0 then
  -- a partition starting from offset 0 (new, or its stream and counter deleted): offsets in a
  -- hash left from before would name the new entries of other keys
  redis.call('DEL', compact)
end
local maxlen = tonumber(ARGV[1])
local n = (#ARGV - 4) / 5
for i = 0, n - 1 do
  local b = 5 + i * 5
  seq = seq + 1
  local args = {KEYS[1]}
  if maxlen > 0 and i == n - 1 then
    args[#args + 1] = 'MAXLEN'
    args[#args + 1] = '~'
    args[#args + 1] = maxlen
  end
  args[#args + 1] = '0-' .. seq
  args[#args + 1] = 'k'
  args[#args + 1] = ARGV[b]
  args[#args + 1] = 'v'
  args[#args + 1] = ARGV[b + 1]
  args[#args + 1] = 'h'
  args[#args + 1] = ARGV[b + 2]
  args[#args + 1] = 't'
  args[#args + 1] = ARGV[b + 3]
  args[#args + 1] = 'c'
  args[#args + 1] = ARGV[2]
  if mark ~= '' then
    args[#args + 1] = 'g'
    args[#args + 1] = mark
  end
  if ARGV[b + 4] ~= '' then
    args[#args + 1] = 'n'
    args[#args + 1] = ARGV[b + 4]
  end
  redis.call('XADD', unpack(args))
  if compact and ARGV[b] ~= '' then
    local old = redis.call('HGET', compact, ARGV[b])
    if old then
      redis.call('XDEL', KEYS[1], '0-' .. (tonumber(old) + 1))
    end
    redis.call('HSET', compact, ARGV[b], seq - 1)
  end
end
redis.call('SET', KEYS[2], seq)
return first
