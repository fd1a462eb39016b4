"""What Flower loads: the ClientApp and the ServerApp (the Coordinator) over the same training code as `federate`."""
