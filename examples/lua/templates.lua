-- `conveyor call -c examples/lua app:render_welcome '"Ada"'` prints the returned table
-- as JSON. The entry has no `method:`, so the function this file returns is called.
local function render_welcome(name)
    return {
        subject = "Welcome, " .. name .. "!",
        lines = {"Hello " .. name .. ",", "your account is ready."},
    }
end

return render_welcome
