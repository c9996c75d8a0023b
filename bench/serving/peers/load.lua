-- wrk: POST one of the prepared multipart bodies (1.body .. N.body in DIR) per request, in turn.
local bodies, i = {}, 0
function init(args)
  local dir, n = args[1], tonumber(args[2])
  for k = 1, n do
    local f = assert(io.open(dir .. "/" .. k .. ".body", "rb"))
    bodies[k] = f:read("*a")
    f:close()
  end
end
function request()
  i = i % #bodies + 1
  return wrk.format("POST", "/classify", {["Content-Type"] = "multipart/form-data; boundary=peersbenchboundary"}, bodies[i])
end
