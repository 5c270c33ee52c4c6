-- Append events to one strategy's stream, exactly once per source position, and trim
-- without outrunning the archive. Works on Redis 6.2 and 7.x; all keys share the
-- strategy's hash tag, so this runs on one Cluster slot and all of it is atomic.
-- KEYS[1] events stream  KEYS[2] epoch  KEYS[3] snapshot hash  KEYS[4] positions hash
-- KEYS[5] gap records (a stream: what trimming past the hold ceiling removed unarchived)
-- KEYS[6] failover records (a stream: the last id kept when a replica took over); passed on a
--   Redis Cluster only: without it the failover check (one INFO, about 9 us) is skipped
-- ARGV[1] retention mode ('minid' | 'maxlen' | '')  ARGV[2] retention ms or max length
-- ARGV[3] epoch to use if the stream is new  ARGV[4] codec version
-- ARGV[5] archive group that holds retention ('' = none)  ARGV[6] hold ceiling in bytes (0 = none)
-- then 8 values per event: tick partition ('' = no position: always appended),
--   tick offset, snapshot op ('set' | 'del' | ''), ts_code, type, schema version, body,
--   the tick partition's generation "<gen>:<start>" ('' = generation 0)
-- Returns {epoch, held bytes, lost, reused, regressed, failovers, id1, id2, ...}: the ids actually written;
-- failovers is how many failover records KEYS[6] holds (0 without KEYS[6]): a writer that sees it
-- grow counts the ids it appended past the last kept one as lost (streams/events.py);
-- reused is how many recorded positions a ticks failover handed out again (see below);
-- regressed is '' or the stream's last id when this call found a new server under it; held bytes is the
-- stream's memory when the archive group kept retention from trimming entries it still needs
-- (0 otherwise); lost is how many such entries this call trimmed past the ceiling (recorded
-- in KEYS[5]).
--
-- The hold: the archive group still needs its oldest pending entry, or when none is pending
-- every entry after its last-delivered id. Trimming keeps those, and one acknowledged (so
-- archived) entry before them, so Redis and the archive always overlap and history can prove
-- there is no hole at the seam. Past the ceiling (MEMORY USAGE, measured only while holding)
-- trimming proceeds as retention says, exactly (no ~), and the loss is recorded here, in
-- the same script, so no trim can remove unarchived events without a record.
local group, ceiling = ARGV[5], tonumber(ARGV[6])
local epoch = redis.call('GET', KEYS[2])
if redis.call('EXISTS', KEYS[1]) == 0 or not epoch then
  -- new, or deleted and recreated: a new epoch, and nothing of the old stream's
  -- positions or snapshot survives (they would describe events that are gone)
  epoch = ARGV[3]
  redis.call('SET', KEYS[2], epoch)
  redis.call('DEL', KEYS[3], KEYS[4])
  if group ~= '' then
    -- the epoch starts with its archive group, so retention holds from the first event even
    -- when no archiver runs yet (BUSYGROUP when an archiver made the stream first: fine)
    redis.pcall('XGROUP', 'CREATE', KEYS[1], group, '0', 'MKSTREAM')
  end
end
-- Failover of this stream's master. Replication is asynchronous: a promoted replica may lack the
-- last events the old master acknowledged (and the positions and snapshot rows with them), so
-- their ids were seen by readers and are gone. The positions hash keeps the replication id of
-- the server that last appended; on another one, the stream's last id is recorded in KEYS[6]
-- (ids after it and before the next append are lost ids) and the next event carries it in
-- `fo`, so a live reader learns in order. A restart that lost its replication history looks
-- the same and records an empty range.
local regressed, failovers = '', 0
if #KEYS >= 6 then
  local replid = string.match(redis.call('INFO', 'replication'), 'master_replid:(%w+)') or ''
  local known = redis.call('HGET', KEYS[4], '@replid')
  if known ~= replid then
    if known then
      local last = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)[1]
      regressed = last and last[1] or '0-0'
      local t0 = redis.call('TIME')
      redis.call('XADD', KEYS[6], 'MAXLEN', '~', '1000', '*', 'epoch', epoch, 'after', regressed,
                 'at_ms', string.format('%d', tonumber(t0[1]) * 1000 + math.floor(tonumber(t0[2]) / 1000)))
    end
    redis.call('HSET', KEYS[4], '@replid', replid)
  end
  failovers = redis.call('XLEN', KEYS[6])
end
local out = {epoch, 0, 0, 0, regressed, failovers}
local HEAD = #out
local high = {}
local gens = {}
local n = (#ARGV - 6) / 8
for i = 0, n - 1 do
  local b = 7 + i * 8
  local part = ARGV[b]
  local fresh = true
  if part ~= '' then
    local off = tonumber(ARGV[b + 1])
    local cur = high[part]
    if cur == nil then
      cur = tonumber(redis.call('HGET', KEYS[4], part) or '-1')
      high[part] = cur
    end
    -- a ticks failover rolled the partition back to <start> in generation <gen>: offsets from
    -- <start> on are new ticks, so the fence forgets the positions at or past it (their events
    -- stay: they came from ticks the failover lost after the join had read them)
    local spec = ARGV[b + 7]
    if spec ~= '' then
      local g, start = string.match(spec, '^(%d+):(%d+)$')
      g, start = tonumber(g), tonumber(start)
      local was = gens[part]
      if was == nil then
        was = tonumber(redis.call('HGET', KEYS[4], part .. '@g') or '0')
        gens[part] = was
      end
      if g > was then
        if cur >= start then
          out[4] = out[4] + cur - start + 1
          cur = start - 1
          high[part] = cur
        end
        gens[part] = g
        redis.call('HSET', KEYS[4], part .. '@g', g)
      end
    end
    if off <= cur then fresh = false else high[part] = off end
  end
  if fresh then
    local id
    if regressed ~= '' and #out == HEAD then
      id = redis.call('XADD', KEYS[1], '*', 'e', ARGV[b + 6], 'y', ARGV[b + 4], 's', ARGV[b + 5], 'c', ARGV[4],
                      'fo', regressed)
    else
      id = redis.call('XADD', KEYS[1], '*', 'e', ARGV[b + 6], 'y', ARGV[b + 4], 's', ARGV[b + 5], 'c', ARGV[4])
    end
    out[#out + 1] = id
    if #out == HEAD + 1 and redis.call('HEXISTS', KEYS[4], '@first') == 0 then
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
if #out == HEAD or ARGV[1] == '' then
  return out
end

local function parse(id)
  local ms, seq = string.match(id, '^(%d+)-(%d+)$')
  return tonumber(ms), tonumber(seq)
end

local function older(a, b)
  local am, as = parse(a)
  local bm, bs = parse(b)
  return am < bm or (am == bm and as < bs)
end

-- The first id the group still needs and the id trimming must keep (one entry earlier), or nil.
local function hold_point(first)
  for _, g in ipairs(redis.call('XINFO', 'GROUPS', KEYS[1])) do
    local info = {}
    for i = 1, #g, 2 do info[g[i]] = g[i + 1] end
    if info['name'] == group then
      local need
      if tonumber(info['pending']) > 0 then
        need = redis.call('XPENDING', KEYS[1], group)[2]
      else
        local ms, seq = parse(info['last-delivered-id'])
        need = string.format('%d-%d', ms, seq + 1)
      end
      if not older(first, need) then
        return need, need
      end
      -- only when an entry precedes `need`: XREVRANGE from below the first entry walks the
      -- whole stream (measured: 15 ms at 50,000 entries)
      return need, redis.call('XREVRANGE', KEYS[1], '(' .. need, '-', 'COUNT', 1)[1][1]
    end
  end
  return nil, nil
end

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)

-- Trim past the ceiling: first what the group has acknowledged, then exactly what retention
-- says; record the entries removed at or after `need` (first and last id, count) as a gap.
local function trim_past_hold(need, cut, maxlen)
  redis.call('XTRIM', KEYS[1], 'MINID', need)
  local before = redis.call('XLEN', KEYS[1])
  local first = redis.call('XRANGE', KEYS[1], '-', '+', 'COUNT', 1)[1][1]
  local last
  if cut then
    last = redis.call('XREVRANGE', KEYS[1], '(' .. cut, '-', 'COUNT', 1)[1][1]
    redis.call('XTRIM', KEYS[1], 'MINID', cut)
  else
    -- the newest entry MAXLEN removes: walk to it in bounded steps (this path is rare)
    local left, from = before - maxlen, '-'
    while left > 0 do
      local got = redis.call('XRANGE', KEYS[1], from, '+', 'COUNT', math.min(left, 1000))
      last = got[#got][1]
      left = left - #got
      from = '(' .. last
    end
    redis.call('XTRIM', KEYS[1], 'MAXLEN', maxlen)
  end
  local lost = before - redis.call('XLEN', KEYS[1])
  local nxt = redis.call('XRANGE', KEYS[1], '-', '+', 'COUNT', 1)[1][1]
  -- one record per outage: a trim that continues the previous record's range extends it
  local total = lost
  local prev = redis.call('XREVRANGE', KEYS[5], '+', '-', 'COUNT', 1)[1]
  if prev then
    local p = {}
    for i = 1, #prev[2], 2 do p[prev[2][i]] = prev[2][i + 1] end
    if p['epoch'] == epoch and p['next'] == first then
      redis.call('XDEL', KEYS[5], prev[1])
      first, total = p['first'], total + tonumber(p['lost'])
    end
  end
  redis.call('XADD', KEYS[5], 'MAXLEN', '~', '1000', '*', 'epoch', epoch, 'first', first, 'last', last,
             'lost', total, 'next', nxt, 'at_ms', string.format('%d', now))
  return lost
end

-- nothing to trim, nothing to look up: the oldest entry is within retention (or under MAXLEN)
local first = redis.call('XRANGE', KEYS[1], '-', '+', 'COUNT', 1)[1][1]
local need, keep = nil, nil
if ARGV[1] == 'minid' then
  local cutoff = now - tonumber(ARGV[2])
  local cut = string.format('%d-0', cutoff)
  if cutoff <= 0 or not older(first, cut) then
    return out
  end
  if group ~= '' then
    need, keep = hold_point(first)
  end
  if need and older(need, cut) and #redis.call('XRANGE', KEYS[1], need, '(' .. cut, 'COUNT', 1) > 0 then
    out[2] = redis.call('MEMORY', 'USAGE', KEYS[1], 'SAMPLES', '5')
    if ceiling > 0 and out[2] > ceiling then
      out[3] = trim_past_hold(need, cut, nil)
    else
      redis.call('XTRIM', KEYS[1], 'MINID', '~', keep)
    end
  elseif keep and older(keep, cut) then
    redis.call('XTRIM', KEYS[1], 'MINID', '~', keep)
  else
    redis.call('XTRIM', KEYS[1], 'MINID', '~', cut)
  end
elseif ARGV[1] == 'maxlen' then
  local maxlen = tonumber(ARGV[2])
  local excess = redis.call('XLEN', KEYS[1]) - maxlen
  if excess <= 0 then
    return out
  end
  if group ~= '' then
    need, keep = hold_point(first)
  end
  if not need then
    redis.call('XTRIM', KEYS[1], 'MAXLEN', '~', maxlen)
    return out
  end
  -- MAXLEN removes at most the `excess` oldest entries: safe when they all precede `keep`
  local below = #redis.call('XRANGE', KEYS[1], '-', '(' .. keep, 'COUNT', excess)
  if below >= excess then
    redis.call('XTRIM', KEYS[1], 'MAXLEN', '~', maxlen)
  elseif below + (keep == need and 0 or 1) >= excess then
    redis.call('XTRIM', KEYS[1], 'MINID', '~', keep)  -- only the acknowledged seam entry is kept over
  else
    out[2] = redis.call('MEMORY', 'USAGE', KEYS[1], 'SAMPLES', '5')
    if ceiling > 0 and out[2] > ceiling then
      out[3] = trim_past_hold(need, nil, maxlen)
    else
      redis.call('XTRIM', KEYS[1], 'MINID', '~', keep)
    end
  end
end
return out
