-- A stand-in mail client: `email.send(to, template, data)` returns `true` or `nil, err`
-- like the queue module's API functions. Mailboxes at invalid.example never accept mail.
local email = {}

function email.send(to, template, data)
    if type(to) ~= "string" or to == "" then
        return nil, errors.new(errors.INVALID, "no recipient")
    end
    if string.find(to, "@invalid.example", 1, true) then
        return nil, errors.new(errors.UNAVAILABLE, "550 mailbox unavailable: " .. to, true)
    end
    logger:info("sent", {to = to, template = template, user = data and data.name})
    return true
end

return email
