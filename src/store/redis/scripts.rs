//! The Lua scripts that change a balance, each one atomic step on one key's
//! slot: KEYS[1] the key's hash, KEYS[2] the operation's marker (its id,
//! remembered for `OP_MEMORY`), KEYS[3] the key's usage ledger row for the
//! charge's day (`{prefix}usage:{<sha256>}:YYYY-MM-DD`, fields
//! `<route>:requests|credits|refunded|cache_hits`, given its TTL of
//! `usage.retention_days` when a route's first request of the day creates
//! its counter; a TTL argument of 0 writes no ledger). The ledger is written
//! by the same script as the balance, so the two cannot drift apart. The
//! scripts off the hit path (cancel, refund, lease report, cache hits) also
//! give a row they write its TTL when it has none (`TTL` answers -1): a
//! refund that lands after its day's row expired, or on a row that lost its
//! TTL, must not leave a row that is kept for ever. The charge keeps to one
//! `EXPIRE` per route and day.

/// Check state and balance, refill at the first charge of a new period
/// (ARGV[3] today, ARGV[4] this month, UTC; never lowering a balance), take
/// ARGV[1] credits, remember the charge by its id unless it was cancelled
/// before it ran, and count it in the ledger (route ARGV[5], TTL ARGV[6]
/// seconds). Returns {code, balance}: 0 unknown, 1 revoked, 2 insufficient,
/// 3 charged, 4 cancelled.
pub(super) const CHARGE: &str = r"
local h = redis.call('HMGET', KEYS[1], 'state', 'credits', 'refill_credits', 'refill_period', 'refilled_for')
if not h[1] then return {0, 0} end
if h[1] ~= 'active' then return {1, 0} end
local credits = tonumber(h[2]) or 0
if h[3] then
  local period = ARGV[4]
  if h[4] == 'daily' then period = ARGV[3] end
  if h[5] ~= period then
    local n = tonumber(h[3]) or 0
    if credits < n then
      credits = n
      redis.call('HSET', KEYS[1], 'credits', n)
    end
    redis.call('HSET', KEYS[1], 'refilled_for', period)
  end
end
local cost = tonumber(ARGV[1])
if credits < cost then return {2, credits} end
if not redis.call('SET', KEYS[2], 'c' .. cost, 'NX', 'PX', ARGV[2]) then return {4, credits} end
if ARGV[6] ~= '0' then
  if redis.call('HINCRBY', KEYS[3], ARGV[5] .. ':requests', 1) == 1 then
    redis.call('EXPIRE', KEYS[3], ARGV[6])
  end
  if cost > 0 then redis.call('HINCRBY', KEYS[3], ARGV[5] .. ':credits', cost) end
end
if cost == 0 then return {3, credits} end
return {3, redis.call('HINCRBY', KEYS[1], 'credits', -cost)}
";

/// Cancel the charge remembered at KEYS[2] (answered as not charged): give
/// it back and take it off the ledger (route ARGV[2], TTL ARGV[3]) if it
/// ran, make it a no-op if it has not. Returns the credits given back, 0 if
/// it was cancelled already (or cost nothing), -1 if Redis has no record of
/// it (not run yet, or forgotten).
pub(super) const CANCEL: &str = r"
local m = redis.call('GET', KEYS[2])
redis.call('SET', KEYS[2], 'x', 'PX', ARGV[1])
if not m then return -1 end
if string.sub(m, 1, 1) ~= 'c' then return 0 end
local cost = tonumber(string.sub(m, 2)) or 0
if cost > 0 and redis.call('EXISTS', KEYS[1]) == 1 then
  redis.call('HINCRBY', KEYS[1], 'credits', cost)
end
if ARGV[3] ~= '0' and redis.call('EXISTS', KEYS[3]) == 1 then
  redis.call('HINCRBY', KEYS[3], ARGV[2] .. ':requests', -1)
  if cost > 0 then redis.call('HINCRBY', KEYS[3], ARGV[2] .. ':credits', -cost) end
  if redis.call('TTL', KEYS[3]) == -1 then redis.call('EXPIRE', KEYS[3], ARGV[3]) end
end
return cost
";

/// Give ARGV[1] credits back once per id (KEYS[2]), and in the ledger
/// (route ARGV[3], TTL ARGV[4]) move them from credits to refunded, taking
/// the request off unless it was delivered (ARGV[5] = '1'); a row without a
/// TTL (one the refund made because its day's row had expired) gets it.
/// Returns the new balance, -1 if the key is unknown, -2 if this refund was
/// applied already.
pub(super) const REFUND: &str = r"
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
if not redis.call('SET', KEYS[2], 'r', 'NX', 'PX', ARGV[2]) then return -2 end
if ARGV[4] ~= '0' then
  local amount = tonumber(ARGV[1])
  if amount > 0 then
    redis.call('HINCRBY', KEYS[3], ARGV[3] .. ':credits', -amount)
    redis.call('HINCRBY', KEYS[3], ARGV[3] .. ':refunded', amount)
  end
  if ARGV[5] ~= '1' then redis.call('HINCRBY', KEYS[3], ARGV[3] .. ':requests', -1) end
  if redis.call('TTL', KEYS[3]) == -1 then redis.call('EXPIRE', KEYS[3], ARGV[4]) end
end
return redis.call('HINCRBY', KEYS[1], 'credits', ARGV[1])
";

/// Add ARGV[1] delivered cache hits of route ARGV[3] to the ledger row
/// KEYS[3], once per flush id (KEYS[2], remembered ARGV[2] ms): a flush
/// whose answer was not seen is sent again with its id and counted once.
/// A row without a TTL gets ARGV[4] seconds. Returns 1 if counted now, 0
/// if this flush was counted before.
pub(super) const HITS: &str = r"
if not redis.call('SET', KEYS[2], 'h', 'NX', 'PX', ARGV[2]) then return 0 end
redis.call('HINCRBY', KEYS[3], ARGV[3] .. ':cache_hits', ARGV[1])
if redis.call('TTL', KEYS[3]) == -1 then redis.call('EXPIRE', KEYS[3], ARGV[4]) end
return 1
";

/// The start of the lease scripts (KEYS[1] the key, KEYS[2] its leases
/// `{prefix}key:{<sha256>}:leases`, a hash of node → "outstanding
/// expires_ms"): the time, and the leases past their expiry taken back,
/// their outstanding credits returned to the key (`leased` is what the
/// key's leases hold). Leaves `now` and `back` (what went back) defined.
macro_rules! lease_prelude {
    () => {
        r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local back = 0
local all = redis.call('HGETALL', KEYS[2])
for i = 1, #all, 2 do
  local out, exp = string.match(all[i + 1], '^(%-?%d+) (%d+)$')
  if not exp or tonumber(exp) < now then
    back = back + (tonumber(out) or 0)
    redis.call('HDEL', KEYS[2], all[i])
  end
end
if back ~= 0 and redis.call('EXISTS', KEYS[1]) == 1 then
  redis.call('HINCRBY', KEYS[1], 'leased', -back)
end
"
    };
}

/// Take a lease of up to ARGV[2] credits for node ARGV[1], expiring ARGV[3]
/// ms from now, after applying a refill as the charge does (ARGV[4] today,
/// ARGV[5] this month). A node's lease grows by what it is granted; only
/// credits not held by any lease are granted. A take granted less than it
/// asked while other nodes hold leases marks the key wanted (KEYS[3], for
/// 3 s): nodes holding its credits idle then give them back at once.
/// Returns {code, granted, credits, leased, others}: code 0 unknown, 1
/// revoked, 2 taken; `others` what the other nodes' leases hold.
pub(super) const LEASE_TAKE: &str = concat!(
    lease_prelude!(),
    r"
local h = redis.call('HMGET', KEYS[1], 'state', 'credits', 'refill_credits', 'refill_period', 'refilled_for', 'leased')
if not h[1] then return {0, 0, 0, 0} end
local credits = tonumber(h[2]) or 0
local leased = tonumber(h[6]) or 0
if h[1] ~= 'active' then return {1, 0, credits, leased} end
if h[3] then
  local period = ARGV[5]
  if h[4] == 'daily' then period = ARGV[4] end
  if h[5] ~= period then
    local n = tonumber(h[3]) or 0
    if credits < n then
      redis.call('HINCRBY', KEYS[1], 'credits', n - credits)
      credits = n
    end
    redis.call('HSET', KEYS[1], 'refilled_for', period)
  end
end
local out = 0
local mine = redis.call('HGET', KEYS[2], ARGV[1])
if mine then out = tonumber(string.match(mine, '^(%-?%d+)')) or 0 end
local grant = math.min(tonumber(ARGV[2]), math.max(credits - leased, 0))
if grant > 0 then
  leased = redis.call('HINCRBY', KEYS[1], 'leased', grant)
end
out = out + grant
redis.call('HSET', KEYS[2], ARGV[1], string.format('%d %d', out, now + tonumber(ARGV[3])))
local others = leased - out
if grant < tonumber(ARGV[2]) and others > 0 then
  redis.call('SET', KEYS[3], '1', 'PX', 3000)
end
return {2, grant, credits, leased, others}
"
);

/// Node ARGV[1] reports: it spent ARGV[2] credits of its lease since its
/// last report (negative: refunds came back into it), and gives ARGV[4]
/// unspent credits back; the key is charged what was spent and its leases
/// hold that much less; the lease is renewed for ARGV[3] ms, or ended when
/// ARGV[5] is 1 (whatever it still holds goes back). A lease already taken
/// back (the node was silent past its expiry) is charged its late spending
/// all the same. Then the ledger deltas: from ARGV[8], triples (index of
/// the usage key among KEYS from 5, field, delta); a row without a TTL gets
/// ARGV[6] seconds (one `TTL` per row and report). Once per report id
/// (KEYS[4], remembered ARGV[7] ms): a
/// report sent again because its answer was lost changes nothing the second
/// time. Returns {credits, leased, outstanding (-1: no lease), active (1/0),
/// wanted (1/0: another node waits for credits, KEYS[3])}.
pub(super) const LEASE_REPORT: &str = concat!(
    lease_prelude!(),
    r"
local known = redis.call('EXISTS', KEYS[1]) == 1
local spent = tonumber(ARGV[2])
local out = -1
local mine = redis.call('HGET', KEYS[2], ARGV[1])
if redis.call('SET', KEYS[4], 'l', 'NX', 'PX', ARGV[7]) then
  if known and spent ~= 0 then redis.call('HINCRBY', KEYS[1], 'credits', -spent) end
  if mine then
    local give = tonumber(ARGV[4])
    out = (tonumber(string.match(mine, '^(%-?%d+)')) or 0) - spent - give
    local back = spent + give
    if ARGV[5] == '1' then
      back = back + out
      redis.call('HDEL', KEYS[2], ARGV[1])
      out = -1
    else
      redis.call('HSET', KEYS[2], ARGV[1], string.format('%d %d', out, now + tonumber(ARGV[3])))
    end
    if known and back ~= 0 then redis.call('HINCRBY', KEYS[1], 'leased', -back) end
  end
  local rows, seen = {}, {}
  for i = 8, #ARGV, 3 do
    local row = KEYS[4 + tonumber(ARGV[i])]
    redis.call('HINCRBY', row, ARGV[i + 1], tonumber(ARGV[i + 2]))
    if not seen[row] then
      seen[row] = true
      rows[#rows + 1] = row
    end
  end
  if ARGV[6] ~= '0' then
    for _, row in ipairs(rows) do
      if redis.call('TTL', row) == -1 then redis.call('EXPIRE', row, ARGV[6]) end
    end
  end
elseif mine then
  out = tonumber(string.match(mine, '^(%-?%d+)')) or 0
end
local h = redis.call('HMGET', KEYS[1], 'credits', 'leased', 'state')
local active = 0
if h[3] == 'active' then active = 1 end
return {tonumber(h[1]) or 0, tonumber(h[2]) or 0, out, active, redis.call('EXISTS', KEYS[3])}
"
);
