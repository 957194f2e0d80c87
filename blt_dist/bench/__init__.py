"""`blt-dist bench` and `blt-dist memory`: the suite (suite.py) with its training workloads and
peers (workloads.py), the data path and generation (datapath.py) and the ZeRO memory probe
(zero_memory.py). May import every wing below the commands; nothing imports it but the CLI.
"""
