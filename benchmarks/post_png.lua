-- wrk script: POST real 32x32 PNGs as raw bodies, rotating through the files listed in $BENCH_PNG_LIST.
local bodies = {}
local counter = 0

local function read(path)
  local f = assert(io.open(path, "rb"))
  local data = f:read("*all")
  f:close()
  return data
end

for path in io.lines(os.getenv("BENCH_PNG_LIST")) do
  bodies[#bodies + 1] = read(path)
end

wrk.method = "POST"
wrk.headers["Content-Type"] = "image/png"

request = function()
  counter = counter + 1
  return wrk.format(nil, nil, nil, bodies[(counter % #bodies) + 1])
end
