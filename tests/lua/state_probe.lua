-- Returns which Lua state ran it and how many calls that state has seen.
local state = string.format("%s", {})
local calls = 0

return function()
    calls = calls + 1
    return {state = state, calls = calls}
end
