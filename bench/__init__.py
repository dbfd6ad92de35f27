"""twinmesh benchmarks: `python -m bench [--quick] [--out docs/BENCHMARKS.md]`.

Figures are recorded, not asserted. Every figure is measured on loopback in the same
run as the floors it is compared with (absolute numbers drift from machine to
machine; ratios to a floor measured a minute earlier do not).

Layout: one module per figure group, each exposing the same three names, run in the
order of `bench.__main__.GROUPS`:

- `TITLE`             the section heading in docs/BENCHMARKS.md;
- `method(ctx) -> str` what is timed, how often, and what the ratio is against
                      (markdown; it may mention the repetition counts of this run);
- `async run(ctx)`    measure and `ctx.add()` one `Figure` per figure.

`measure.py` holds the figure model, statistics, bounds and progress; `report.py`
renders the terminal table and the markdown file. A later group (the peer systems
of /work/shared/PEERS.md) is one more module in `GROUPS`.
"""
