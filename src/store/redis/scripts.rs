//! The Lua scripts that change a balance, each one atomic step on one key's
//! slot: KEYS[1] the key's hash, KEYS[2] the operation's marker (its id,
//! remembered for `OP_MEMORY`), KEYS[3] the key's usage ledger row for the
//! charge's day (`{prefix}usage:{<sha256>}:YYYY-MM-DD`, fields
//! `<route>:requests|credits|refunded|cache_hits`, given its TTL of
//! `usage.retention_days` when a route's first request of the day creates
//! its counter; a TTL argument of 0 writes no ledger). The ledger is written by the same script as the balance, so
//! the two cannot drift apart.

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
end
return cost
";

/// Give ARGV[1] credits back once per id (KEYS[2]), and in the ledger
/// (route ARGV[3], TTL ARGV[4]) move them from credits to refunded, taking
/// the request off unless it was delivered (ARGV[5] = '1'). Returns the new
/// balance, -1 if the key is unknown, -2 if this refund was applied already.
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
end
return redis.call('HINCRBY', KEYS[1], 'credits', ARGV[1])
";
