#include <cstdio>
int main() { std::puts("dmatrain"); return 0; }
