//! Hostile input: store. (Tests follow.)
