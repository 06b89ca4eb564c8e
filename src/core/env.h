// Switches read from the environment (DMAT_ATTN_PATH, DMAT_DMA_DENSE, ...): one parser, so every
// switch accepts exactly its listed values and rejects anything else with the same kind of message.
#pragma once
#include <initializer_list>

namespace dmat {

// The index in `choices` of the value of environment variable `name`; `fallback` when it is unset
// or empty. Any other value fails with an Error naming the variable, the value and the choices.
int env_choice(const char* name, std::initializer_list<const char*> choices, int fallback);

}  // namespace dmat
