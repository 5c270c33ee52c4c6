-- Consumer-group coordination for the faust driver: leased membership, rebalance rounds,
-- the leader's assignment, and commits fenced by partition ownership.
-- Every key shares the group's hash tag, so this runs on one Cluster slot, on Redis 6.2 and 7.x.
--
-- KEYS 1 members  zset  member -> lease deadline (ms, server time)
--      2 meta     hash  round, deadline, rebalance_ms, gen, gen_round, leader, leader_round
--      3 joined   hash  member -> the round it joined
--      4 md       hash  member -> its assignor metadata for that round
--      5 asg      hash  member -> its assignment for generation `gen`
--      6 owners   hash  "topic|partition" -> "member|gen" ("*|gen" when shared)
--      7 offsets  hash  "topic|partition" -> committed offset (the next one to read)
--      8 wake     stream, one entry per new round or generation: members block on it
-- ARGV 1 operation, 2 member id, 3 lease ms, then the operation's own.
--
-- A round is a rebalance in progress: it starts when a member joins, leaves, changes its
-- subscription, or lets its lease expire. Every live member revokes what it holds and joins
-- the round; once all have joined (or the round's deadline passed), the first to ask leads:
-- it computes the assignment with faust's assignor and writes it as generation gen+1.

local members, meta, joined, md, asg, owners, offsets, wake =
  KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[7], KEYS[8]
local op, member, lease = ARGV[1], ARGV[2], tonumber(ARGV[3])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)

local function num(key, field, default)
  local v = redis.call('HGET', key, field)
  if v then return tonumber(v) end
  return default
end

local function state()
  return num(meta, 'round', 0), num(meta, 'gen', 0)
end

local function notify(why)
  redis.call('XADD', wake, 'MAXLEN', '~', 100, '*', 'e', why)
end

local function new_round(why)
  local r = redis.call('HINCRBY', meta, 'round', 1)
  redis.call('HSET', meta, 'deadline', now + num(meta, 'rebalance_ms', 60000))
  notify(why)
  return r
end

local function forget(m)
  redis.call('ZREM', members, m)
  redis.call('HDEL', joined, m)
  redis.call('HDEL', md, m)
  redis.call('HDEL', asg, m)
end

-- members whose lease ran out are gone; their partitions move in a new round
local function expire()
  local dead = redis.call('ZRANGEBYSCORE', members, '-inf', now)
  for _, m in ipairs(dead) do forget(m) end
  if #dead > 0 then new_round('expired') end
  return #dead
end

if op == 'heartbeat' then
  expire()
  local round, gen = state()
  if not redis.call('ZSCORE', members, member) then return {'evicted', round, gen} end
  redis.call('ZADD', members, now + lease, member)
  return {'ok', round, gen}

elseif op == 'join' then
  -- ARGV 4 metadata, 5 '1' when the subscription changed, 6 rebalance timeout ms
  redis.call('HSET', meta, 'rebalance_ms', ARGV[6])
  expire()
  local known = redis.call('ZSCORE', members, member)
  redis.call('ZADD', members, now + lease, member)
  local round, gen = state()
  if not known or ARGV[5] == '1' then round = new_round('join') end
  redis.call('HSET', joined, member, round)
  redis.call('HSET', md, member, ARGV[4])
  return {'ok', round, gen}

elseif op == 'sync' then
  -- ARGV 4 the round this member joined
  expire()
  local round, gen = state()
  if not redis.call('ZSCORE', members, member) then return {'evicted', round, gen} end
  redis.call('ZADD', members, now + lease, member)
  if tonumber(ARGV[4]) ~= round then return {'again', round, gen} end
  if num(meta, 'gen_round', -1) == round then
    local mine = redis.call('HGET', asg, member)
    if not mine then
      forget(member)
      return {'evicted', round, gen}
    end
    return {'assigned', round, gen, mine}
  end
  local missing = {}
  for _, m in ipairs(redis.call('ZRANGE', members, 0, -1)) do
    if num(joined, m, -1) ~= round then missing[#missing + 1] = m end
  end
  if #missing > 0 then
    if now < num(meta, 'deadline', 0) then return {'wait', round, gen} end
    -- too slow to join: left out of this round; its next heartbeat says evicted
    for _, m in ipairs(missing) do forget(m) end
  end
  if num(meta, 'leader_round', -1) == round and redis.call('HGET', meta, 'leader') ~= member then
    -- another member leads this round; if it dies, its lease expiry starts the next one
    return {'wait', round, gen}
  end
  redis.call('HSET', meta, 'leader_round', round, 'leader', member)
  local out = {'lead', round, gen}
  for _, m in ipairs(redis.call('ZRANGE', members, 0, -1)) do
    out[#out + 1] = m
    out[#out + 1] = redis.call('HGET', md, m)
  end
  return out

elseif op == 'assign' then
  -- ARGV 4 round, 5 number of members, then member/assignment pairs, then partition/owner pairs
  local round, gen = state()
  if tonumber(ARGV[4]) ~= round or redis.call('HGET', meta, 'leader') ~= member
      or num(meta, 'leader_round', -1) ~= round then
    return {'stale', round, gen}
  end
  gen = redis.call('HINCRBY', meta, 'gen', 1)
  redis.call('HSET', meta, 'gen_round', round)
  redis.call('DEL', asg, owners)
  local i = 6
  for _ = 1, tonumber(ARGV[5]) do
    redis.call('HSET', asg, ARGV[i], ARGV[i + 1])
    i = i + 2
  end
  while i < #ARGV do
    redis.call('HSET', owners, ARGV[i], ARGV[i + 1] .. '|' .. gen)
    i = i + 2
  end
  notify('assigned')
  return {'ok', round, gen}

elseif op == 'commit' then
  -- ARGV 4 the member's generation, then partition/offset pairs; returns the refused partitions
  local mine, shared = member .. '|' .. ARGV[4], '*|' .. ARGV[4]
  local refused = {}
  for i = 5, #ARGV - 1, 2 do
    local owner = redis.call('HGET', owners, ARGV[i])
    if owner == mine or owner == shared then
      redis.call('HSET', offsets, ARGV[i], ARGV[i + 1])
    else
      refused[#refused + 1] = ARGV[i]
    end
  end
  return refused

elseif op == 'leave' then
  if redis.call('ZSCORE', members, member) then
    forget(member)
    new_round('leave')
  end
  local round, gen = state()
  return {'ok', round, gen}
end
return redis.error_reply('unknown group operation ' .. tostring(op))
