-- The example's Lua handlers. `email` is the module email.lua next to conveyor.yaml;
-- `queue`, `logger` and `errors` are globals of the sandbox.
local email = require("email")

-- The queue module's example consumer handler, unchanged: returning `nil, err` nacks the message, so
-- it is retried and, after max_attempts, dead-lettered.
function handle_email(payload)
    local msg = queue.message()

    logger:info("Processing", {
        message_id = msg:id(),
        to = payload.to
    })

    local ok, err = email.send(payload.to, payload.template, payload.data)
    if err then
        return nil, err  -- 消息将被重新入队或进入死信队列
    end
end

-- Reads app:emails_dlq: the dead-letter headers say where the message came from and why.
function report_dead_letter(payload)
    local msg = queue.message()
    logger:warn("gave up on an email", {
        to = payload.to,
        reason = msg:header("x_dead_letter_reason"),
        attempts = msg:header("attempts"),
        from_queue = msg:header("x_original_queue"),
    })
end
