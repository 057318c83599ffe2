"""One conversation per room: transports, rooms, engines and the CLI."""
