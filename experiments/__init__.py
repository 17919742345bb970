"""One module per paper experiment; each wires data + model + configuration into harness."""
