// Factories of the communicator implementations (internal to src/dist; users call world()).
#pragma once
#include <memory>

#include "dist/communicator.h"

namespace dmat::dist {

std::unique_ptr<Communicator> make_single();
// Initialises MPI (once per process; finalised at exit) and returns a communicator over MPI_COMM_WORLD.
std::unique_ptr<Communicator> make_mpi();

}  // namespace dmat::dist
