"""The lab: a whole twinmesh deployment (NICs, links, twins) from one TOML file.

    twinctl lab up labs/line3.toml [--netns] [--foreground]
    twinctl lab status | restart [NODE] | down

`topology` reads and checks the file, `plan` turns it into command lines, `delay`
and `relay` impair loopback links, `runner` keeps the processes running (the lab
supervisor), `state` is `lab.json`, the record every other shell reads.
"""
