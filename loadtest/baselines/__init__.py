"""The servers users would otherwise run, configured fairly (same workers, same threads) but naively."""
