"""Where a server's GPU time goes: `coserve profile` (command.py) runs conditions with a window
of engine steps captured by the torch profiler in each server (server/step_profile.py,
experiment/profiling.py); trace.py and cross.py turn the traces into records.py's results,
analyze.py adds the rep's clocks and clock-event reasons; ncu.py wraps Nsight Compute."""
