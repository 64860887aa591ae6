"""This process's memory figures from Linux /proc/self/status (the memory benchmarks' one reader)."""


def status_gb(field: str) -> float:
    """A /proc/self/status field given in kB (VmRSS, VmHWM, RssAnon, RssFile, ...) in GB; NaN when absent."""
    with open('/proc/self/status') as f:
        for line in f:
            if line.startswith(field + ':'):
                return int(line.split()[1]) * 1024 / 1e9
    return float('nan')
