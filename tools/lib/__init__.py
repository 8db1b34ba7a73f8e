"""The torch-side library: twins, bridge, backends, media, generation, SD."""
