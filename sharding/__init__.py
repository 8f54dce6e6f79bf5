"""Model packages cut into layer ranges, and the partitioner that places them."""
