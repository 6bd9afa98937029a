"""The I/O worker (`parley io-worker`, and `parley beat` on its app): webhook deliveries and
their retry sweep, transcript retention. Never loads the model."""
