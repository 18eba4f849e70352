-- levee: one GCRA decision over every limit of one client on one route.
-- KEYS[i]: the state of limit i, named by the limit's identity, not its
-- position (all in one hash slot: {route:client}).
-- ARGV[2i-1], ARGV[2i]: limit i's emission interval and capacity, microseconds.
-- The clock is Redis's own, so every gateway sharing this Redis agrees on time.
-- Returns {allowed, wait_us, tightest (0-based), remaining, reset_us}.
-- A refused request changes nothing; an allowed one stores each new TAT with a
-- TTL equal to the time until that bucket is full again, so the state expires
-- by itself (no counter that outlives its purpose).
-- A stored TAT is capped at now + capacity, as in gcra.rs: after a failover to
-- a server whose clock is behind, a client is owed at most its burst.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local n = #KEYS
local tats = {}
local worst, worst_wait = 0, -1
for i = 1, n do
  local interval = tonumber(ARGV[2 * i - 1])
  local capacity = tonumber(ARGV[2 * i])
  local tat = tonumber(redis.call('GET', KEYS[i]) or '0') or 0
  if tat > now + capacity then
    -- Stored, even if this request is refused: a cap recomputed from each new
    -- now would never drain.
    tat = now + capacity
    redis.call('SET', KEYS[i], string.format('%d', tat), 'PX', math.ceil(capacity / 1000))
  end
  tats[i] = tat
  local used = math.max(tat, now) + interval - now
  if used > capacity and used - capacity > worst_wait then
    worst, worst_wait = i, used - capacity
  end
end
if worst > 0 then
  return {0, worst_wait, worst - 1, 0, math.max(tats[worst] - now, 0)}
end
local best, best_remaining, best_reset = 1, -1, 0
for i = 1, n do
  local interval = tonumber(ARGV[2 * i - 1])
  local capacity = tonumber(ARGV[2 * i])
  local new_tat = math.max(tats[i], now) + interval
  local ttl = new_tat - now
  redis.call('SET', KEYS[i], string.format('%d', new_tat), 'PX', math.ceil(ttl / 1000))
  local remaining = math.floor((capacity - ttl) / interval)
  if best_remaining < 0 or remaining < best_remaining then
    best, best_remaining, best_reset = i, remaining, ttl
  end
end
return {1, 0, best - 1, best_remaining, best_reset}
