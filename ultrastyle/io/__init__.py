"""Image files in and out, and expansion of file/directory/glob arguments."""
