"""Tools for studying FLUX with minflux: shape traces and parameter tables, attention maps, the course exercises,
and the benchmark against the reference libraries. Each runs as `python -m minflux.study.NAME`."""
