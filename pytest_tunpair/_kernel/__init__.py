"""The kernel: namespaces, devices, routing, processes, sockets, timers."""
