"""Out-of-band power and serial consoles of the nodes (docs/power.md).

`core` (operations, results, the power-on ramp, node selection; no I/O),
`drivers` (IPMI with pyghmi or ipmitool, Redfish with sushy, Wake-on-LAN,
manual), `controller` (one operation on many nodes within the caps),
`targets` (what the inventory says about each node's BMC), `console`
(capture, logs, attach), `service` (how `bootherd serve` builds them) and
`client` (the CLI's way to the running server).
"""
