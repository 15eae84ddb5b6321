-- A stand-in mail client for the seed's consumer example (`email.send(to, template, data)`).
-- Addresses at bounce.example fail with UNAVAILABLE; every other send is recorded on
-- the queue app:sent so that the test can see it.
local email = {}

function email.send(to, template, data)
    if string.find(to, "@bounce.example", 1, true) then
        return nil, errors.new(errors.UNAVAILABLE, "550 mailbox unavailable: " .. to, true)
    end
    return queue.publish("app:sent", {to = to, template = template, data = data})
end

return email
