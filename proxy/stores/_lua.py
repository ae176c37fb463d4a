"""Lua scripts of the Redis store; each is one atomic step.

Number handling: Lua numbers are doubles, exact for integers up to 2^53 (about
9e15 µ$, $9 billion), far above any budget. Amounts are still written to Redis
as the *strings* received in ARGV (``HINCRBY`` does the int64 arithmetic): Redis
formats a Lua number argument with ``%.14g``, which would turn large values into
``1.2e+17`` and break ``HINCRBY``. ``HINCRBY x -0`` is rejected by Redis, hence
the ``~= '0'`` guards.

Budget layout, per ceiling (both under the same ``{b}`` hash tag):
``H = <p>{b}:c:<ceiling key>`` hash ``settled``, ``reserved`` (sum of live
holds) and ``r:<rid>`` -> amount; ``Z = <p>{b}:z:<ceiling key>`` zset rid ->
expiry (epoch seconds). Expired holds are removed lazily by every script that
reads a ceiling, so a crashed replica's holds stop counting at their expiry.
"""

from __future__ import annotations

_CLEAN = """
local function clean(h, z, now)
  local dead = redis.call('ZRANGEBYSCORE', z, '-inf', now)
  for _, id in ipairs(dead) do
    local a = redis.call('HGET', h, 'r:' .. id)
    if a then
      if a ~= '0' then redis.call('HINCRBY', h, 'reserved', '-' .. a) end
      redis.call('HDEL', h, 'r:' .. id)
    end
  end
  if #dead > 0 then redis.call('ZREMRANGEBYSCORE', z, '-inf', now) end
end
local function used(h)
  local v = redis.call('HMGET', h, 'settled', 'reserved')
  return (tonumber(v[1]) or 0) + (tonumber(v[2]) or 0)
end
"""

# KEYS: H1, Z1, H2, Z2, ...   ARGV: rid, amount, now, expires_at, then per ceiling: limit, keep_s
# Returns {ok (1|0), failing index (1-based, 0 if ok), fill_1, fill_2, ...} (fills before this hold).
RESERVE = (
    _CLEAN
    + """
local rid, amount, now, exp = ARGV[1], tonumber(ARGV[2]), ARGV[3], ARGV[4]
local n = #KEYS / 2
local field = 'r:' .. rid
local out = {1, 0}
if redis.call('HEXISTS', KEYS[1], field) == 1 then
  -- retried call whose first reply was lost: the hold is already in place
  for i = 1, n do out[2 + i] = used(KEYS[2 * i - 1]) - amount end
  return out
end
for i = 1, n do
  local h = KEYS[2 * i - 1]
  clean(h, KEYS[2 * i], now)
  local u = used(h)
  out[2 + i] = u
  if out[2] == 0 and u + amount > tonumber(ARGV[3 + 2 * i]) then
    out[1] = 0
    out[2] = i
  end
end
if out[1] == 0 then return out end
for i = 1, n do
  local h, z, keep = KEYS[2 * i - 1], KEYS[2 * i], ARGV[4 + 2 * i]
  if ARGV[2] ~= '0' then redis.call('HINCRBY', h, 'reserved', ARGV[2]) end
  redis.call('HSET', h, field, ARGV[2])
  redis.call('ZADD', z, exp, rid)
  redis.call('EXPIRE', h, keep)
  redis.call('EXPIRE', z, keep)
end
return out
"""
)

# KEYS: H1, Z1, ...   ARGV: now.  Returns used per ceiling (after lazy cleanup).
USAGE = (
    _CLEAN
    + """
local out = {}
for i = 1, #KEYS / 2 do
  clean(KEYS[2 * i - 1], KEYS[2 * i], ARGV[1])
  out[i] = used(KEYS[2 * i - 1])
end
return out
"""
)

# KEYS: done marker, H1, Z1, ...   ARGV: rid, actual, done_keep_s, then per ceiling keep_s.
# Returns 1 when charged, 0 when this reservation was already settled.
SETTLE = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
local rid, actual = ARGV[1], ARGV[2]
local field = 'r:' .. rid
for i = 1, (#KEYS - 1) / 2 do
  local h, z, keep = KEYS[2 * i], KEYS[2 * i + 1], ARGV[3 + i]
  local a = redis.call('HGET', h, field)
  if a then
    if a ~= '0' then redis.call('HINCRBY', h, 'reserved', '-' .. a) end
    redis.call('HDEL', h, field)
  end
  redis.call('ZREM', z, rid)
  if actual ~= '0' then
    redis.call('HINCRBY', h, 'settled', actual)
    redis.call('EXPIRE', h, keep)
  end
end
redis.call('SET', KEYS[1], '1', 'EX', ARGV[3])
return 1
"""

# KEYS: idem key.  ARGV: body_hash, token, lock_ms.  Hash fields: st (f=in flight, d=done), h, tok, rec.
IDEM_BEGIN = """
local v = redis.call('HMGET', KEYS[1], 'st', 'h', 'tok', 'rec')
if not v[1] then
  redis.call('HSET', KEYS[1], 'st', 'f', 'h', ARGV[1], 'tok', ARGV[2])
  redis.call('PEXPIRE', KEYS[1], ARGV[3])
  return {'new'}
end
if v[2] ~= ARGV[1] then return {'mismatch'} end
if v[1] == 'd' then return {'replay', v[4]} end
if v[3] == ARGV[2] then return {'new'} end  -- our own retried call
return {'in_flight'}
"""

# KEYS: idem key.  ARGV: body_hash, record, ttl_ms.
IDEM_COMPLETE = """
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'st', 'd', 'h', ARGV[1], 'rec', ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return 1
"""

IDEM_ABORT = """
if redis.call('HGET', KEYS[1], 'st') == 'f' then return redis.call('DEL', KEYS[1]) end
return 0
"""

# KEYS: marker.  ARGV: token, ttl_ms.  The token makes a retried call (lost reply) still answer 1.
ONCE = """
local v = redis.call('GET', KEYS[1])
if not v then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
if v == ARGV[1] then return 1 end
return 0
"""

# KEYS: record, index zset, find zset.  ARGV: id, created_at, keep_s, field, value, ...
APPROVAL_CREATE = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV, 4))
redis.call('EXPIRE', KEYS[1], ARGV[3])
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[1])
redis.call('ZADD', KEYS[3], ARGV[2], ARGV[1])
redis.call('EXPIRE', KEYS[3], ARGV[3])
return 1
"""

# KEYS: record.  ARGV: now, new status, note or '', has_note, by or '', has_by, token.
# Returns {1 if this call decided it else 0, record (HGETALL) after the step}; {} if unknown. The token
# makes a retried call whose first reply was lost still report that it won.
APPROVAL_DECIDE = """
local v = redis.call('HMGET', KEYS[1], 'status', 'expires_at', 'decided_tok')
if not v[1] then return {} end
if v[3] == ARGV[7] then return {1, redis.call('HGETALL', KEYS[1])} end
if v[1] == 'pending' and tonumber(ARGV[1]) < tonumber(v[2]) then
  redis.call('HSET', KEYS[1], 'status', ARGV[2], 'decided_at', ARGV[1], 'decided_tok', ARGV[7])
  if ARGV[4] == '1' then redis.call('HSET', KEYS[1], 'note', ARGV[3]) end
  if ARGV[6] == '1' then redis.call('HSET', KEYS[1], 'decided_by', ARGV[5]) end
  return {1, redis.call('HGETALL', KEYS[1])}
end
return {0, redis.call('HGETALL', KEYS[1])}
"""

# KEYS: record.  ARGV: token.  approved -> used exactly once; a retried call with the same token wins again.
APPROVAL_CONSUME = """
local v = redis.call('HMGET', KEYS[1], 'status', 'used_by')
if v[1] == 'approved' then
  redis.call('HSET', KEYS[1], 'status', 'used', 'used_by', ARGV[1])
  return 1
end
if v[1] == 'used' and v[2] == ARGV[1] then return 1 end
return 0
"""

# KEYS: record.  ARGV: token.  used -> approved (a use given back), once: a retried call with the same
# token answers 1 again without giving back a second use, even if the approval was consumed meanwhile.
APPROVAL_UNCONSUME = """
local v = redis.call('HMGET', KEYS[1], 'status', 'unused_by')
if not v[1] then return 0 end
if v[2] == ARGV[1] then return 1 end
if v[1] == 'used' then
  redis.call('HSET', KEYS[1], 'status', 'approved', 'unused_by', ARGV[1])
  redis.call('HDEL', KEYS[1], 'used_by')
  return 1
end
return 0
"""

# KEYS: verdict hash.  ARGV: token, outcome, by, ttl_ms.  Replaces the verdict; returns the previous
# outcome (nil if none). A retried call with the same token answers what the first one saw.
FEEDBACK_SET = """
local v = redis.call('HMGET', KEYS[1], 'outcome', 'tok', 'prev')
if v[2] == ARGV[1] then return v[3] end
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'outcome', ARGV[2], 'by', ARGV[3], 'tok', ARGV[1])
if v[1] then redis.call('HSET', KEYS[1], 'prev', v[1]) end
redis.call('PEXPIRE', KEYS[1], ARGV[4])
return v[1]
"""
