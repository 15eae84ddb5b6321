local queue = require("queue")
