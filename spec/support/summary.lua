--- busted output handler: the usual terminal output (utfTerminal on a tty, plainTerminal
-- otherwise), then, as the very last line of the run, a plain "N passed, N failed" (errors
-- count as failed; ", N skipped" is added when some specs are pending).
-- Used from .busted (output = "spec/support/summary.lua"); busted itself exits non-zero on
-- any failure or error.
return function(options)
  local busted = require "busted"
  local term = require "term"
  local tty = io.type(io.stdout) == "file" and term.isatty(io.stdout)
  local inner = require("busted.outputHandlers." .. (tty and "utfTerminal" or "plainTerminal"))(options)

  local passed, failed, skipped = 0, 0, 0

  -- The inner handler's counters are reset per run (--repeat); add each run's up.
  busted.subscribe({"suite", "end"}, function()
    passed = passed + inner.successesCount
    failed = failed + inner.failuresCount + inner.errorsCount
    skipped = skipped + inner.pendingsCount
    return nil, true
  end)

  busted.subscribe({"exit"}, function()
    local line = ("%d passed, %d failed"):format(passed, failed)
    if skipped > 0 then line = line .. (", %d skipped"):format(skipped) end
    io.write(line, "\n")
    io.flush()
    return nil, true
  end)

  return inner
end
