//! Hostile input: connections. (Tests follow.)
