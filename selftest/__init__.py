"""`routesae selftest`: every stage once on a device, checked against a CPU float32 reference."""
