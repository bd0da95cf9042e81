-- Argo CD health check for kquant.io/QuantizationJob (kstatus conditions written by the
-- kquant operator). Install as resource.customizations.health.kquant.io_QuantizationJob in
-- argocd-cm (see README, "GitOps"). Maps:
--   status missing, or written for an older metadata.generation  -> Progressing
--   Stalled=True  (a failed run or an invalid spec: only a spec change helps) -> Degraded
--   Ready=True    (validated; promoted when spec.promotion is set)             -> Healthy
--   otherwise     (Reconciling=True: pending, queued in Kueue, running)       -> Progressing
local hs = {}
local function condition(conditions, ctype)
  for _, c in ipairs(conditions or {}) do
    if c.type == ctype then
      return c
    end
  end
  return nil
end

if obj.status == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for the kquant operator to write a status"
  return hs
end

local generation = obj.metadata and obj.metadata.generation
local observed = obj.status.observedGeneration
if generation ~= nil and observed ~= generation then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to observe generation " .. tostring(generation)
    .. " (status is for " .. tostring(observed) .. ")"
  return hs
end

local conditions = obj.status.conditions
local function current(c)
  -- A condition of an older generation says nothing about this one.
  return c ~= nil and (c.observedGeneration == nil or generation == nil
    or c.observedGeneration == generation)
end
local function describe(c)
  local text = c.reason or ""
  if c.message ~= nil and c.message ~= "" then
    text = text .. ": " .. c.message
  end
  return text
end

local stalled = condition(conditions, "Stalled")
if current(stalled) and stalled.status == "True" then
  hs.status = "Degraded"
  hs.message = describe(stalled)
  return hs
end
local ready = condition(conditions, "Ready")
if current(ready) and ready.status == "True" then
  hs.status = "Healthy"
  hs.message = describe(ready)
  return hs
end
local reconciling = condition(conditions, "Reconciling")
hs.status = "Progressing"
if current(reconciling) and reconciling.status == "True" then
  hs.message = describe(reconciling)
else
  hs.message = obj.status.message or "Waiting for the Job"
end
return hs
