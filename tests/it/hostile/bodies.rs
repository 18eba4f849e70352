//! Hostile input: bodies. (Tests follow.)
